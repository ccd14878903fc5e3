"""Each architecture lorakit writes as GGUF, run in llama.cpp (llama-cpp-python) against
transformers: the logits of a tiny random model with a LoRA adapter, merged GGUF and base GGUF
+ adapter GGUF, position by position.

    .venv/bin/pip install --no-binary llama-cpp-python llama-cpp-python   # see gguf_llama_cpp.py
    .venv/bin/python bench/gguf_architectures.py [--tokens 200]

tests/test_gguf.py checks the same files with transformers' GGUF reader, which does not read
`rope_freqs`, has no Mixtral and only knows some keys; this is the check in llama.cpp's own
graphs (its RoPE layout, Qwen3's q/k norms, the MoE expert tensors, scaled RoPE). Models: 2
layers, hidden 64, SmolLM2's tokenizer (49152 tokens), LoRA r=4 on all linear layers with
random A and B (the MoE models: attention only); the reference is the merged model in
transformers, fp32, on one sequence of random token ids.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

LLAMA3 = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
EXPERTS_KEPT = {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}  # see below
CASES = {
    "llama (tied head)": ("llama", {}),
    "llama, llama3 RoPE": ("llama", {"rope_parameters": LLAMA3, "head_dim": 16}),
    "llama, linear RoPE": ("llama", {"rope_parameters": {"rope_type": "linear",
                                                         "rope_theta": 1e4, "factor": 4.0}}),
    "mistral": ("mistral", {}),
    "qwen2 (q/k/v biases)": ("qwen2", {}),
    "qwen3 (q/k norms)": ("qwen3", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "mixtral": ("mixtral", {}),
}
# llama.cpp's LoRA GGUF has no layout lorakit checked for fused expert weights, so the MoE
# adapter stays on attention (all-linear includes the experts, and the export refuses those)
ADAPTER = {"qwen3_moe": EXPERTS_KEPT, "mixtral": EXPERTS_KEPT}


def llama_cpp_logits(path: Path, ids: list[int], lora: Path | None = None) -> np.ndarray:
    from llama_cpp import GGML_TYPE_F32, Llama

    # an f32 KV cache (llama.cpp's default is f16) so that only the graphs are compared
    llm = Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=len(ids),
                n_batch=len(ids), logits_all=True, verbose=False, n_threads=2,
                type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, flash_attn=False)
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=200)
    args = p.parse_args()
    from test_gguf import adapted, tiny
    from transformers import AutoTokenizer

    from lorakit.base.default_model import default_model_dir
    from lorakit.base.loading import machine_summary
    from lorakit.lora.gguf_export import export_gguf, export_gguf_lora

    tok = AutoTokenizer.from_pretrained(default_model_dir())
    ids = torch.randint(0, len(tok), (args.tokens,), generator=torch.Generator().manual_seed(0))
    print(f"machine: {machine_summary()}")
    print(f"{args.tokens} random token ids; max |logit difference| against transformers' merged "
          f"model (fp32), and the positions whose top token agrees\n", flush=True)
    print(f"{'model':24s} {'merged f32 GGUF':>24s} {'base GGUF + adapter GGUF':>26s}")
    work = Path(tempfile.mkdtemp())
    for name, (arch, kw) in CASES.items():
        model = tiny(arch, len(tok), initializer_range=0.2, max_position_embeddings=args.tokens,
                     **kw)
        export_gguf(model, work / "base.gguf", tok, "f32")
        lora = adapted(model, **ADAPTER.get(arch, {}))
        export_gguf(lora, work / "merged.gguf", tok, "f32")
        export_gguf_lora(lora, work / "adapter.gguf")
        with torch.no_grad():
            lora.merge_adapter()
            ref = lora(input_ids=ids[None]).logits[0].double().numpy()
        cells = []
        for path, adapter in ((work / "merged.gguf", None),
                              (work / "base.gguf", work / "adapter.gguf")):
            got = llama_cpp_logits(path, ids.tolist(), adapter)
            agree = int((got.argmax(-1) == ref.argmax(-1)).sum())
            cells.append(f"{np.abs(got - ref).max():.1e}, {agree}/{len(ids)}")
        print(f"{name:24s} {cells[0]:>24s} {cells[1]:>26s}", flush=True)


if __name__ == "__main__":
    main()
