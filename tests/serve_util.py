"""Start `lorakit serve` as a user would (a fresh process on a free loopback port) for tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from conftest import make_tiny_llama, perturb_trainables

from lorakit import LoraConfig, get_lora_model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lorakit serve ...` with its output kept; stopped with SIGTERM."""

    def __init__(self, *args: str, timeout: float = 120, env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "lorakit", "serve", "--port", str(self.port), *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            for line in self.proc.stdout:
                self.lines.append(line)
                if "serving on" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout) or self.proc.poll() is not None:
            self.proc.kill()
            raise RuntimeError("lorakit serve did not start:\n" + "".join(self.lines)[-3000:])

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def client(self, **kw):
        from openai import OpenAI
        kw.setdefault("api_key", "unused")
        return OpenAI(base_url=self.url + "/v1", max_retries=0, timeout=120, **kw)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def write_adapters(root: Path, vocab: int, n: int = 3, **model_kw) -> dict[str, Path]:
    """`n` trained-looking adapters (random, non-zero B) for the tiny chat model."""
    paths = {}
    for i in range(n):
        model = get_lora_model(
            make_tiny_llama(vocab_size=vocab, initializer_range=0.2, **model_kw),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                       init_lora_weights=False),
        )
        perturb_trainables(model, seed=10 + i)
        with torch.no_grad():  # make adapters matter for greedy decoding on a random model
            for p in model.parameters():
                if p.requires_grad:
                    p.mul_(8)
        model.save_pretrained(root / f"a{i}")
        paths[f"a{i}"] = root / f"a{i}"
    return paths


def wait_until(check, timeout: float = 30, every: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(every)
    return False
