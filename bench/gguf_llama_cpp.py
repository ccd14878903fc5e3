"""lorakit's GGUF exports run in llama.cpp itself (llama-cpp-python), against lorakit's
unmerged adapter, greedily on the demo's held-out prompts.

    make demo                                       # writes lorakit-demo/adapter and its data
    CMAKE_ARGS="-DGGML_NATIVE=ON" .venv/bin/pip install --no-binary llama-cpp-python \
        llama-cpp-python                            # builds llama.cpp from source (~30 min)
    .venv/bin/python bench/gguf_llama_cpp.py --demo lorakit-demo [--rows 100]

Not in CI: it compiles llama.cpp. Exports (with `lorakit export`, in fresh processes):
the base alone as f32 GGUF, the adapter as f32 LoRA GGUF, the merged model as f32 and q8_0.
llama.cpp runs base + adapter (`lora_path`), the merged files, and the packaged Q4_1 base +
adapter (what an Ollama user runs). Every side gets the same prompt token ids (the chat
template rendered by transformers), and llama.cpp's own tokenizer is checked to give those ids
from the text. Prints, per side, the rows whose greedy answer equals lorakit's token for token
and the exact-match score against the references.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MAX_NEW = 16


def export(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lorakit", "export", "--overwrite", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def lorakit_answers(adapter: Path, prompts: list[list[int]], eos: set[int]) -> list[list[int]]:
    import torch

    from lorakit.base import load_model
    from lorakit.lora import LoraModel

    model, _ = load_model(dtype="float32")
    lora = LoraModel.from_pretrained(model, str(adapter))
    answers = []
    with torch.inference_mode():
        for ids in prompts:
            out = lora.generate(input_ids=torch.tensor([ids]), max_new_tokens=MAX_NEW,
                                do_sample=False, eos_token_id=sorted(eos), pad_token_id=2)
            answers.append(cut(out[0, len(ids):].tolist(), eos))
    return answers


def cut(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def llama_cpp_answers(model: Path, prompts: list[list[int]], eos: set[int],
                      lora: Path | None = None) -> list[list[int]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=512,
                n_threads=2, n_batch=512, verbose=False, seed=0)
    answers = []
    for ids in prompts:
        llm.reset()
        tokens = []
        for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
            if t in eos or len(tokens) == MAX_NEW:
                break
            tokens.append(t)
        answers.append(tokens)
    return answers, llm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", default="lorakit-demo", help="a `lorakit demo` output directory")
    p.add_argument("--rows", type=int, default=100)
    p.add_argument("--work", default="bench-gguf", help="where the exports go")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from lorakit.base.default_model import default_model_dir, find_default_gguf
    from lorakit.base.loading import machine_summary

    demo, work = Path(args.demo), Path(args.work)
    adapter = demo / "adapter"
    rows = [json.loads(line) for line in (demo / "data" / "eval.jsonl").read_text().splitlines()]
    rows = rows[: args.rows]
    tok = AutoTokenizer.from_pretrained(default_model_dir())
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
             for r in rows]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    refs = [r["completion"][0]["content"] for r in rows]
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}

    seconds = {
        "merged f32": export(["--adapter", adapter, "--output", work / "merged-f32.gguf",
                              "--outtype", "f32"]),
        "merged q8_0": export(["--adapter", adapter, "--output", work / "merged-q8_0.gguf",
                               "--outtype", "q8_0"]),
        "base f32": export(["--output", work / "base-f32.gguf", "--outtype", "f32"]),
        "adapter f32": export(["--adapter", adapter, "--format", "gguf-lora", "--output",
                               work / "adapter-f32.gguf", "--outtype", "f32"]),
    }
    ours = lorakit_answers(adapter, prompts, eos)
    sides = {
        "llama.cpp base f32 GGUF + adapter GGUF": (work / "base-f32.gguf",
                                                   work / "adapter-f32.gguf"),
        "llama.cpp merged f32 GGUF": (work / "merged-f32.gguf", None),
        "llama.cpp merged q8_0 GGUF": (work / "merged-q8_0.gguf", None),
        "llama.cpp packaged Q4_1 base + adapter GGUF": (find_default_gguf(),
                                                         work / "adapter-f32.gguf"),
    }
    print(f"machine: {machine_summary()}")
    print("export seconds (lorakit export, fresh process, includes loading): "
          + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    em = sum(tok.decode(a) == r for a, r in zip(ours, refs))
    print(f"\n{'side':46s} {'same tokens':>12s} {'exact match':>12s}")
    print(f"{'lorakit, unmerged adapter (fp32)':46s} {'-':>12s} {em:>8d}/{len(rows)}")
    for name, (model, lora) in sides.items():
        answers, llm = llama_cpp_answers(model, prompts, eos, lora)
        same = sum(a == b for a, b in zip(answers, ours))
        em = sum(tok.decode(a) == r for a, r in zip(answers, refs))
        print(f"{name:46s} {same:>8d}/{len(rows)} {em:>8d}/{len(rows)}")
        if "base f32" in name:  # llama.cpp's tokenizer from the exported vocabulary
            own = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
            agree = sum(a == b for a, b in zip(own, prompts))
            print(f"  llama.cpp's own tokenization of the prompt texts: {agree}/{len(rows)} "
                  "equal to transformers'")
        for a, b, r in list(zip(answers, ours, refs))[:100]:
            if a != b:
                print(f"    differs: llama.cpp {tok.decode(a)!r} lorakit {tok.decode(b)!r} "
                      f"(want {r!r})")
                break


if __name__ == "__main__":
    main()
