"""QLoRA memory: storage bits of the NF4 base, and peak RSS / speed of short LoRA runs per base.

    .venv/bin/python bench/qlora_memory.py [--steps 2 --batch 4 --seq 128]
        [--bases fp32,bf16,nf4,nf4-bf16] [--gradient-checkpointing]

Model: the embedded default (SmolLM2-135M-Instruct). LoRA r=16, alpha=32, dropout 0.05 on all
linear layers, AdamW, batch 4 x 128 random tokens, 1 warm-up step + `--steps` timed steps.
Each base runs in its own subprocess (this parent never imports torch, so a child does not
inherit a large parent's RSS). Per base it reports:
  peak RSS       getrusage(RUSAGE_SELF).ru_maxrss over the child's whole life (load included);
  train peak     the same counter after a reset (/proc/self/clear_refs, Linux) taken once the
                 model is loaded, so the quantization spike while loading is left out;
  after load     current RSS once the model is loaded and every weight paged in;
  tokens/s       trained tokens per second over the timed steps.
Bases: fp32, bf16 (frozen weights bf16, adapters fp32), nf4 (bitsandbytes NF4 + double quant,
embeddings/norms/lm_head fp32, compute fp32) and nf4-bf16 (same, bf16 non-quantized parts and
compute). Target: frozen linear weights <= 4.2 bits per parameter with double quantization.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

BASES = {  # name -> load_model kwargs
    "fp32": dict(dtype="float32"),
    "bf16": dict(dtype="bfloat16"),
    "nf4": dict(dtype="float32", quantization="nf4"),
    "nf4-bf16": dict(dtype="bfloat16", quantization="nf4"),
}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    import resource
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024  # macOS reports bytes


def _reset_peak() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(base: str, steps: int, batch: int, seq: int, checkpointing: bool) -> dict:
    import ctypes
    import gc
    import time

    import torch

    from lorakit import LoraConfig, get_lora_model
    from lorakit.base import load_model, prepare_for_kbit_training
    from lorakit.base.quantize import quantized_storage_bits

    torch.manual_seed(0)
    rss_import = _rss_mib()
    model, _ = load_model(tokenizer=False, **BASES[base])
    info: dict = {"base": base}
    if "quantization" in BASES[base]:
        bits, n = quantized_storage_bits(model)
        info.update(quant_bits=bits, quant_params=n)
    prepare_for_kbit_training(model, gradient_checkpointing=checkpointing)
    lm = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                                          target_modules="all-linear"))
    trainable = [p for p in lm.parameters() if p.requires_grad]
    info["trainable"] = sum(p.numel() for p in trainable)
    info["frozen_bytes"] = sum(p.numel() * p.element_size() for p in lm.parameters()
                               if not p.requires_grad)
    with torch.no_grad():  # page in weights that safetensors left memory-mapped but untouched
        for p in lm.parameters():
            p.sum()
    gc.collect()
    try:  # hand freed heap pages back, so "after load" is what the model really holds
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    info["rss_import_mib"] = rss_import
    info["rss_after_load_mib"] = _rss_mib()
    info["peak_load_mib"] = _maxrss_mib()
    reset = _reset_peak()

    opt = torch.optim.AdamW(trainable, lr=2e-4)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    lm.train()
    losses = []
    for step in range(steps + 1):
        if step == 1:
            t0 = time.perf_counter()
        loss = lm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    elapsed = time.perf_counter() - t0
    info.update(tokens_per_s=steps * batch * seq / elapsed, s_per_step=elapsed / steps,
                losses=losses, train_peak_mib=_maxrss_mib() if reset else None)
    info["peak_mib"] = max(info["peak_load_mib"], _maxrss_mib())
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bases", default="fp32,bf16,nf4,nf4-bf16")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="checkpoint activations, so that base weights dominate memory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args.steps, args.batch, args.seq,
                                             args.gradient_checkpointing)))
        return

    from lorakit.base.loading import machine_summary
    print(f"qlora_memory: {machine_summary()}", flush=True)
    bases = args.bases.split(",")
    unknown = [b for b in bases if b not in BASES]
    if unknown:
        ap.error(f"unknown base(s) {unknown}; choose from {list(BASES)}")
    print(f"QLoRA memory bench: SmolLM2-135M-Instruct, LoRA r=16 alpha=32 all-linear, "
          f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps (+1 warm-up)"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    results = []
    for base in bases:
        cmd = [sys.executable, __file__, "--worker", base, "--steps", str(args.steps),
               "--batch", str(args.batch), "--seq", str(args.seq)]
        cmd += ["--gradient-checkpointing"] if args.gradient_checkpointing else []
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"{base}: worker failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        results.append(json.loads(line[0][7:]))

    for r in results:
        if "quant_bits" in r:
            bits, n = r["quant_bits"], r["quant_params"]
            print(f"\n[{r['base']}] frozen linear weights: {n:,} parameters in "
                  f"{bits / 8 / 2**20:.1f} MiB = {bits / n:.3f} bits/parameter "
                  f"(packed 4-bit + uint8 absmax + nested fp32 absmax + code tables; "
                  f"target <= 4.2; fp32 would be {n * 4 / 2**20:.1f} MiB)")
    print(f"\n{'base':<9} {'frozen MiB':>10} {'after load':>10} {'peak RSS':>9} "
          f"{'train peak':>10} {'tokens/s':>9} {'s/step':>7}  losses")
    for r in results:
        tp = f"{r['train_peak_mib']:.0f}" if r["train_peak_mib"] is not None else "n/a"
        print(f"{r['base']:<9} {r['frozen_bytes'] / 2**20:>10.0f} {r['rss_after_load_mib']:>10.0f} "
              f"{r['peak_mib']:>9.0f} {tp:>10} {r['tokens_per_s']:>9.1f} "
              f"{r['s_per_step']:>7.2f}  {r['losses']}")
    if results:
        print(f"(MiB; RSS after importing torch+transformers+lorakit: "
              f"{results[0]['rss_import_mib']:.0f} MiB; trainable LoRA parameters: "
              f"{results[0]['trainable']:,})")


if __name__ == "__main__":
    main()
