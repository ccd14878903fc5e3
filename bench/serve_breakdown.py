"""Where `lorakit serve`'s scheduler spends its time, base vs 8 adapters, without HTTP.

    .venv/bin/python bench/serve_breakdown.py [--seconds 30 --repeats 2 --max-prefill-tokens N]

The engine of `lorakit serve` (lorakit.serving.server.build: the default model, bf16), driven
in process by 16 closed-loop clients with bench/serve_load.py's requests (the chat template
applied, greedy), for `--seconds`; the base alone and the 8 adapters of serve_load alternate,
`--repeats` times. Prints output tokens/s, the time per prefill forward and per decoding step,
the time to enter a mixed-adapter batch (each new batch composition), the TTFT percentiles of
all but each client's first request, and the adapters/base ratios. A diagnostic for
bench/serve_load.py's ratios: it shows which part of the work the adapters slow down.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import make_adapters, pct, requests_list, run_clients  # noqa: E402

from lorakit.base.loading import machine_summary  # noqa: E402
from lorakit.inference.engine import PREFILL_TOKENS_PER_STEP, Request, Sampling  # noqa: E402
from lorakit.lora import BASE_ADAPTER  # noqa: E402
from lorakit.serving.server import build  # noqa: E402


def instrument(engine, totals: dict, counts: dict) -> None:
    """Time the engine's prefill forwards, decoding steps and mixed-batch entries."""

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - start
                counts[name] += 1
        return wrapper

    engine._forward_prompts = timed("prefill", engine._forward_prompts)
    engine._decode_step = timed("decode", engine._decode_step)
    enter = engine.model.mixed_adapter_batch

    @contextlib.contextmanager
    def entered(*args, **kwargs):
        start = time.perf_counter()
        with enter(*args, **kwargs):
            totals["enter"] += time.perf_counter() - start
            counts["enter"] += 1
            yield

    engine.model.mixed_adapter_batch = entered


def run(engine, models: list[str], seconds: float, clients: int = 16) -> dict:
    totals: dict = defaultdict(float)
    counts: dict = defaultdict(int)
    instrument(engine, totals, counts)
    tok = engine.tokenizer
    reqs = requests_list()
    done: list[tuple[int, float, bool]] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(c: int) -> None:
        i = c
        while time.perf_counter() < deadline:
            text, max_tokens = reqs[i % len(reqs)]
            ids = tok.apply_chat_template([{"role": "user", "content": text}],
                                          add_generation_prompt=True)
            ids = list(ids if isinstance(ids, list) else ids["input_ids"])
            finished = threading.Event()
            seen: dict = {}
            sent = time.perf_counter()

            def on_event(event, seen=seen, finished=finished, sent=sent):
                seen.setdefault("ttft", time.perf_counter() - sent)
                if event.finish_reason or event.error:
                    seen["tokens"] = event.completion_tokens
                    finished.set()

            engine.submit(Request(ids, models[i % len(models)],
                                  Sampling(max_tokens, temperature=0), on_event))
            finished.wait()
            with lock:
                done.append((seen["tokens"], seen["ttft"], i == c))
            i += clients

    wall = run_clients(client, clients)
    later = sorted(ttft for _, ttft, first in done if not first)
    ms = {k: 1000 * totals[k] / max(counts[k], 1) for k in ("prefill", "decode", "enter")}
    return {"tok_s": sum(n for n, _, _ in done) / wall, "requests": len(done), **ms,
            "prefills": counts["prefill"], "steps": counts["decode"],
            "ttft50": pct(later, 50), "ttft99": pct(later, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--max-prefill-tokens", type=int, default=PREFILL_TOKENS_PER_STEP)
    args = ap.parse_args()
    print(machine_summary())
    results: dict[str, list[dict]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp), 8)
        for _ in range(args.repeats):
            for kind in ("adapters", "base"):
                adapters = [f"a{i}={p}" for i, p in enumerate(paths)] if kind == "adapters" else []
                server = build(None, adapters, dtype="bfloat16", max_loras=8,
                               max_prefill_tokens=args.max_prefill_tokens)
                engine = server.engine
                engine.start()
                try:
                    models = [f"a{i}" for i in range(8)] if adapters else [BASE_ADAPTER]
                    r = run(engine, models, args.seconds)
                finally:
                    engine.stop()
                results[kind].append(r)
                print(f"{kind:8s} {r['tok_s']:6.1f} tok/s  {r['requests']} requests  prefill "
                      f"{r['prefill']:5.1f} ms ({r['prefills']})  step {r['decode']:5.1f} ms "
                      f"({r['steps']})  enter {r['enter']:4.1f} ms  TTFT p50 {r['ttft50']:.3f} "
                      f"p99 {r['ttft99']:.3f} s", flush=True)
    med = {kind: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
           for kind, rs in results.items()}
    a, b = med["adapters"], med["base"]
    print(f"\nmedians of {args.repeats}: adapters/base tokens/s {a['tok_s'] / b['tok_s']:.3f}; "
          f"prefill forward {b['prefill'] / a['prefill']:.3f}; decoding step "
          f"{b['decode'] / a['decode']:.3f}; TTFT p99/p50 adapters {a['ttft99'] / a['ttft50']:.2f}"
          f", base {b['ttft99'] / b['ttft50']:.2f}")


if __name__ == "__main__":
    main()
