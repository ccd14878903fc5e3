"""lorakit on one torch device: the same numbers as PEFT, the same training step as on the CPU,
and its speed against TRL + PEFT, in one run.

    .venv/bin/python bench/device_check.py --device cuda                   # tiny random Llama
    .venv/bin/python bench/device_check.py --device cuda --model default   # embedded SmolLM2-135M
    .venv/bin/python bench/device_check.py --device cpu --model path/to/model --dtype float32

Checks (each prints PASS or FAIL; the exit status is 1 if any fails):
  1. PEFT parity: an adapter with non-zero B, made once by lorakit and once by PEFT, is loaded
     by both libraries (`LoraModel.from_pretrained` / `PeftModel.from_pretrained`) onto the same
     base on DEVICE, in fp32 and bf16: max |logits difference|, unmerged and after
     `merge_and_unload`, within a tolerance per dtype (fp32: 1e-5 of the largest logit; bf16:
     twice the larger of PEFT's and the base model's own bf16 error against fp32).
  2. DEVICE against the CPU: a few SFT steps (lorakit's SFTTrainer, fp32, same seed, data and
     starting adapter) on DEVICE and on the CPU, on a plain base and on a bitsandbytes NF4 base
     (QLoRA): the adapter's change and the loss after the steps agree, and the loss went down.
  3. Speed (printed, never failing): training tokens/s of lorakit's SFTTrainer and of TRL's
     SFTTrainer + PEFT, and greedy decoding tokens/s of `LoraModel.generate` and of
     `PeftModel.generate`, same model, adapter shape, rows and dtype, with the ratios.

The tiny default model (hidden 64, 2 layers, a word-level tokenizer over the data's words) needs
no download; `--model default` is the model `lorakit.load_model()` loads with no argument.
With `--device cpu`, check 2 compares the CPU with itself: it keeps the path working (CI runs it,
tests/test_device_check.py); the comparison means something on another device.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

R, ALPHA = 8, 16
VOCAB = 128  # the tiny model's vocabulary, padded from the tokenizer's ~30 words
# lorakit's logits against PEFT's, same adapter. fp32: within FP32_RTOL × max |logits| (rounding
# in another order). Lower precision: each library rounds the adapter's output at its own points,
# so the two differ about as much as either differs from fp32, as the base alone does. Measured
# in bf16 on the CPU: SmolLM2-135M (logits up to 35), lorakit and PEFT 1.6-2.2 apart, each
# 0.9-3.1 off its fp32 logits (mean 0.14-0.32, neither lower on both adapters), the base alone
# 1.5; tiny model 0.15-0.19 apart, 0.19-0.26 off. The limit: LOW_PRECISION_FACTOR × the larger
# of PEFT's and the base's max error against their fp32 logits.
FP32_RTOL = 1e-5
LOW_PRECISION_FACTOR = 2.0
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# DEVICE against the CPU after the steps (fp32): relative norm of the adapter's change, and the
# loss's relative difference. Adam's first step is about lr·sign(g), so a gradient element near
# zero can flip sign between devices: the norm, not the max, keeps that from failing the check.
# NF4: the same codes on both devices, but other dequantize + matmul kernels (looser).
STEP_TOL = {None: (1e-2, 1e-4), "nf4": (5e-2, 1e-3)}


@dataclass
class Check:
    """One line of the table: a correctness check (ok is True/False) or a figure (ok None)."""

    name: str
    value: str
    limit: str = ""
    ok: bool | None = None

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: ""}[self.ok]
        return f"  {self.name:48s} {self.value:>14s} {self.limit:>14s}  {verdict}"


# ------------------------------------------------------------------------ model, data, adapters


def sum_rows(n: int, sums_per_row: int, seed: int = 0) -> list[dict]:
    """Plain-text rows of "a plus b is c ." sentences: any tokenizer reads them."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 10, (n, sums_per_row, 2), generator=g).tolist()
    return [{"text": " ".join(f"{a} plus {b} is {a + b} ." for a, b in row)} for row in pairs]


def word_tokenizer():
    """A word-level tokenizer over the rows' words, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>", "plus", "is", "."] + [str(i) for i in range(19)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def save_tiny_model(path: Path) -> Path:
    """A random 2-layer Llama and its tokenizer as a model directory. Every linear layer's
    out_features is a multiple of 32: bitsandbytes' CPU 4-bit tiles need it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = word_tokenizer()
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def same_length_ids(tokenizer, texts: list[str], device: str) -> torch.Tensor:
    """The texts' token ids cut to the shortest one's length: a batch without padding."""
    rows = tokenizer(texts).input_ids
    n = min(map(len, rows))
    return torch.tensor([row[:n] for row in rows], device=device)


def load(src: str | None, device: str, dtype: torch.dtype, quantization: str | None = None):
    """The base model on `device` (lorakit.load_model: None is the embedded default model)."""
    from lorakit import load_model

    model, _ = load_model(
        src, dtype=dtype, quantization=quantization, device=device, tokenizer=False
    )
    return model


def lora_kwargs() -> dict:
    """The adapter shape both libraries build; init_lora_weights=False: B is not zero."""
    return dict(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights=False,
    )


def make_adapters(src: str | None, out: Path) -> dict[str, Path]:
    """One adapter made by lorakit, one by PEFT (fp32, on the CPU), saved in PEFT's format."""
    import peft

    from lorakit import LoraConfig, get_lora_model

    torch.manual_seed(1)
    ours = get_lora_model(load(src, "cpu", torch.float32), LoraConfig(**lora_kwargs()))
    ours.save_pretrained(out / "lorakit")
    torch.manual_seed(2)
    theirs = peft.get_peft_model(load(src, "cpu", torch.float32), peft.LoraConfig(**lora_kwargs()))
    theirs.save_pretrained(out / "peft")
    return {"lorakit": out / "lorakit", "peft": out / "peft"}


# ---------------------------------------------------------------------- check 1: PEFT parity


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float().cpu()


def parity_checks(
    src: str | None, adapter: Path, made_by: str, device: str, dtype: torch.dtype, fp32=None
) -> tuple[list[Check], tuple[torch.Tensor, torch.Tensor]]:
    """lorakit and PEFT load `adapter` onto the same base: logits, then merged logits. `fp32`:
    (PEFT's, the base's) fp32 logits, which set the limit for a lower-precision `dtype`.
    Returns the checks and (PEFT's, the base's) logits."""
    import peft

    from lorakit import LoraModel

    ids = torch.randint(3, 20, (2, 24), generator=torch.Generator().manual_seed(3)).to(device)
    base = logits(load(src, device, dtype), ids)
    ours = LoraModel.from_pretrained(load(src, device, dtype), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(load(src, device, dtype), adapter).eval()
    ref = logits(theirs, ids)
    name = f"{SHORT[dtype]} {made_by}-made adapter"
    if fp32 is None:
        tol = FP32_RTOL * ref.abs().max().item()
        # an adapter that barely moved the logits would let a lorakit that ignored it pass
        moved = (ref - base).abs().max().item()
        limit = 1000 * tol
        checks = [
            Check(f"{name}: adapter moves logits", f"{moved:.3g}", f"> {limit:.3g}", moved > limit)
        ]
    else:
        noise = max((ref - fp32[0]).abs().max().item(), (base - fp32[1]).abs().max().item())
        tol, checks = LOW_PRECISION_FACTOR * noise, []
    for what, ours_logits, ref_logits in (
        ("logits", logits(ours, ids), ref),
        ("merged", logits(ours.merge_and_unload(), ids), logits(theirs.merge_and_unload(), ids)),
    ):
        diff = (ours_logits - ref_logits).abs().max().item()
        checks.append(
            Check(f"{name}: {what} = PEFT's", f"{diff:.3g}", f"<= {tol:.3g}", diff <= tol)
        )
    return checks, (ref, base)


# -------------------------------------------------------------- check 2: DEVICE against the CPU


def trainable(model) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad
    }


@torch.no_grad()
def batch_loss(model, batch: torch.Tensor) -> float:
    """The model's loss on a fixed batch of the training rows, in eval mode."""
    was_training = model.training
    model.eval()
    loss = model(input_ids=batch, labels=batch).loss.item()
    model.train(was_training)
    return loss


def run_args(steps: int, dtype: torch.dtype, out: Path, learning_rate: float = 2e-4) -> dict:
    """The training arguments lorakit's TrainConfig and TRL's SFTConfig both take (TRL's names);
    a new output directory under `out`."""
    return dict(
        output_dir=tempfile.mkdtemp(dir=out),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_length=256,
        bf16=dtype == torch.bfloat16,
        seed=0,
        logging_steps=steps,
        disable_tqdm=True,
    )


def train_steps(src, adapter, device, quantization, tokenizer, steps) -> tuple[dict, float, float]:
    """(adapter change, loss before, loss after) of `steps` lorakit SFT steps on `device`, fp32,
    starting from `adapter`."""
    from lorakit import LoraModel, SFTTrainer, TrainConfig

    rows = sum_rows(8, 4, seed=4)
    batch = same_length_ids(tokenizer, [r["text"] for r in rows[:4]], device)
    base = load(src, device, torch.float32, quantization)
    model = LoraModel.from_pretrained(base, adapter, is_trainable=True)
    before, loss0 = trainable(model), batch_loss(model, batch)
    with tempfile.TemporaryDirectory() as out:
        args = run_args(steps, torch.float32, Path(out), learning_rate=2e-3)
        config = TrainConfig(**args, device=device, save_steps=None)
        SFTTrainer(model, config, train_data=rows, tokenizer=tokenizer).train()
    after = trainable(model)
    return {n: after[n] - before[n] for n in before}, loss0, batch_loss(model, batch)


def relative_norm(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the tensors."""
    num = sum(((a[n] - b[n]) ** 2).sum() for n in b) ** 0.5
    return float(num / sum((b[n] ** 2).sum() for n in b) ** 0.5)


def step_checks(src, adapter, device, quantization, tokenizer, steps) -> list[Check]:
    """The same steps on `device` and on the CPU agree, and the loss went down on both."""
    name = "QLoRA nf4" if quantization else "LoRA fp32"
    dev = train_steps(src, adapter, device, quantization, tokenizer, steps)
    cpu = train_steps(src, adapter, "cpu", quantization, tokenizer, steps)
    delta_tol, loss_tol = STEP_TOL[quantization]
    delta = relative_norm(dev[0], cpu[0])
    loss = abs(dev[2] - cpu[2]) / abs(cpu[2])
    down = all(after < before for _, before, after in (dev, cpu))
    return [
        Check(
            f"{name} {steps} steps: adapter change vs CPU",
            f"{delta:.3g}",
            f"<= {delta_tol:.0e}",
            delta <= delta_tol,
        ),
        Check(
            f"{name} {steps} steps: loss vs CPU (relative)",
            f"{loss:.3g}",
            f"<= {loss_tol:.0e}",
            loss <= loss_tol,
        ),
        Check(f"{name} loss goes down on both", f"{dev[1]:.3f}->{dev[2]:.3f}", "", down),
    ]


# ------------------------------------------------------------------------------- 3: the speed


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    """(fn's result, its wall time in seconds, the device's queued work included)."""
    sync(device)
    t0 = time.perf_counter()
    result = fn()
    sync(device)
    return result, time.perf_counter() - t0


def train_speed_lorakit(src, device, dtype, tokenizer, rows, steps, out) -> float:
    """Tokens/s (non-pad, over the wall time of train()) of lorakit's SFTTrainer."""
    from lorakit import LoraConfig, SFTTrainer, TrainConfig, get_lora_model

    torch.manual_seed(0)
    model = get_lora_model(load(src, device, dtype), LoraConfig(**lora_kwargs()))
    config = TrainConfig(**run_args(steps, dtype, out), device=device, save_steps=None)
    trainer = SFTTrainer(model, config, train_data=rows, tokenizer=tokenizer)
    result, seconds = timed(trainer.train, device)
    return result.tokens_per_second * result.seconds / seconds


def train_speed_trl(src, device, dtype, tokenizer, rows, steps, out) -> float:
    """Tokens/s (TRL's num_tokens over the wall time of train()) of TRL's SFTTrainer + PEFT."""
    import peft
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(0)
    # TRL places the model on the device transformers' Trainer picks: the CPU with use_cpu
    config = SFTConfig(
        **run_args(steps, dtype, out),
        use_cpu=torch.device(device).type == "cpu",
        save_strategy="no",
        report_to=[],
        gradient_checkpointing=False,  # lorakit's TrainConfig default, for the same work
    )
    trainer = SFTTrainer(
        model=load(src, device, dtype),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft.LoraConfig(**lora_kwargs()),
    )
    _, seconds = timed(trainer.train, device)
    return max(r.get("num_tokens", 0) for r in trainer.state.log_history) / seconds


def decode_speeds(models: dict, ids: torch.Tensor, new_tokens: int, device: str, repeats: int):
    """Name -> (tokens/s, the tokens) of greedy generation of exactly `new_tokens` tokens per row:
    each model's best of `repeats` runs, the models taking turns (other processes share a CPU),
    after a warm-up."""
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    n = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    best = {name: float("inf") for name in models}
    out = {}
    with torch.no_grad():
        for model in models.values():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        for _ in range(repeats):
            for name, model in models.items():
                out[name], seconds = timed(lambda m=model: m.generate(ids, **n, **kw), device)
                best[name] = min(best[name], seconds)
    return {name: (ids.shape[0] * new_tokens / best[name], out[name].cpu()) for name in models}


def speed_rows(name: str, ours: float, theirs: float, peer: str) -> list[Check]:
    return [
        Check(f"{name} lorakit", f"{ours:.1f} tok/s"),
        Check(f"{name} {peer}", f"{theirs:.1f} tok/s"),
        Check(f"{name} ratio lorakit/{peer}", f"{ours / theirs:.2f}"),
    ]


def speed_checks(src, adapter, device, dtype, tokenizer, args, out) -> list[Check]:
    """Training and decoding tokens/s of lorakit and of the peer, in this process."""
    import peft

    from lorakit import LoraModel

    rows = sum_rows(4 * args.bench_steps, 24, seed=5)  # ~145 tokens a row
    trained = [0.0, 0.0]
    for _ in range(args.repeats):  # best of the runs, taking turns: other processes share a CPU
        for i, train in enumerate((train_speed_lorakit, train_speed_trl)):
            tps = train(src, device, dtype, tokenizer, rows, args.bench_steps, out)
            trained[i] = max(trained[i], tps)
    ids = same_length_ids(tokenizer, [r["text"] for r in sum_rows(4, 5, seed=6)], device)
    ours = LoraModel.from_pretrained(load(src, device, dtype), adapter).eval()
    theirs = peft.PeftModel.from_pretrained(load(src, device, dtype), adapter).eval()
    decoded = decode_speeds(
        {"lorakit": ours, "PEFT": theirs}, ids, args.new_tokens, device, args.repeats
    )
    (ours_tps, ours_out), (theirs_tps, theirs_out) = decoded["lorakit"], decoded["PEFT"]
    same = (ours_out == theirs_out).all(dim=1).sum().item()
    return [
        *speed_rows(f"train {SHORT[dtype]}", *trained, "TRL+PEFT"),
        *speed_rows(f"decode {SHORT[dtype]}", ours_tps, theirs_tps, "PEFT"),
        Check("decode: rows with PEFT's greedy tokens", f"{same}/{ids.shape[0]}"),
    ]


# -------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", required=True, help="a torch device: cpu, cuda, cuda:1, ...")
    ap.add_argument(
        "--model",
        default=None,
        help="a model directory or hub id; 'default': the embedded default model; "
        "none: a tiny random Llama",
    )
    ap.add_argument(
        "--dtype",
        default="auto",
        help="the speed runs' dtype (float32, bfloat16); auto: lorakit's choice for the device",
    )
    ap.add_argument("--train-steps", type=int, default=2, help="check 2's SFT steps")
    ap.add_argument("--bench-steps", type=int, default=6, help="training steps timed")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs of each side (best)")
    ap.add_argument("--new-tokens", type=int, default=32, help="decoded tokens timed, per row")
    return ap.parse_args(argv)


def run_checks(args: argparse.Namespace, tmp: Path) -> list[Check]:
    from lorakit import load_model
    from lorakit.base.loading import resolve_dtype

    src = {None: None, "default": None}.get(args.model, args.model)
    if args.model is None:
        src = str(save_tiny_model(tmp / "tiny"))
    _, tokenizer = load_model(src, dtype="float32", device="cpu")
    adapters = make_adapters(src, tmp)
    checks: list[Check] = []
    for made_by, adapter in adapters.items():
        fp32, logits32 = parity_checks(src, adapter, made_by, args.device, torch.float32)
        bf16, _ = parity_checks(src, adapter, made_by, args.device, torch.bfloat16, logits32)
        checks += fp32 + bf16
    for quantization in (None, "nf4"):
        checks += step_checks(
            src, adapters["lorakit"], args.device, quantization, tokenizer, args.train_steps
        )
    dtype = resolve_dtype(args.dtype, args.device)
    return checks + speed_checks(src, adapters["lorakit"], args.device, dtype, tokenizer, args, tmp)


def main(argv: list[str] | None = None) -> int:
    from lorakit.base.loading import machine_summary

    args = parse_args(argv)
    print(
        f"device_check: --device {args.device} --model {args.model or '(tiny random Llama)'}; "
        f"{machine_summary()}",
        flush=True,
    )
    if torch.device(args.device).type == "cuda":
        print(f"device_check: {torch.cuda.get_device_name(args.device)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        checks = run_checks(args, Path(tmp))
    print(f"\n  {'check':48s} {'value':>14s} {'limit':>14s}")
    for check in checks:
        print(check.line())
    failed = [c.name for c in checks if c.ok is False]
    print(
        f"\ndevice_check: {len(failed)} of {sum(c.ok is not None for c in checks)} checks "
        f"failed{': ' + '; '.join(failed) if failed else ''}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
