"""A preloaded process that forks `lorakit` CLI runs: what `python -m lorakit ARGS` does, minus
the 5-8 s of importing torch and transformers each time (the fault suite starts ~100 runs).

Started by harness.Zygote with OMP_NUM_THREADS=1, so no OpenMP thread pool exists when it forks
(a forked child would hang in it). It imports the modules a run imports and never computes.
Each child keeps Python's own signal handlers (this is a fresh interpreter too), redirects fd 0/1/2, applies the resource limits asked
for, runs `lorakit.cli.main(argv)` and exits with its status, as `python -m lorakit` does: an
uncaught exception prints Python's traceback and exits 1.

Protocol: one JSON object per line on stdin (requests) and stdout (replies):
    {"op": "spawn", "argv", "cwd", "stdout", "stderr", "env", "fsize"} -> {"pid"}
    {"op": "poll", "pid"} -> {"status": None | exit status (negative: killed by that signal)}
    {"op": "wait", "pid"} -> {"status"}
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import traceback

PRELOAD = (  # what a training run imports: a child then starts training in about a second
    "matplotlib.pyplot",
    "torch",
    "transformers",
    "transformers.models.llama.modeling_llama",
    "transformers.tokenization_utils_fast",
    "safetensors.torch",
    "lorakit.cli",
    "lorakit.recipes",
    "lorakit.training",
    "lorakit.demo.run",
)


def _status(raw: int) -> int:
    return -os.WTERMSIG(raw) if os.WIFSIGNALED(raw) else os.WEXITSTATUS(raw)


def _child(req: dict, channels: tuple[int, int]) -> None:
    """Become the CLI run (never returns)."""
    for fd in channels:
        os.close(fd)
    os.environ.update(req.get("env") or {})
    os.chdir(req["cwd"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, fd)
        os.close(out)
    if req.get("fsize") is not None:
        # a full disk: writes past the limit fail with EFBIG (SIGXFSZ would kill instead)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (req["fsize"], req["fsize"]))
    sys.argv = ["lorakit", *req["argv"]]
    import lorakit.cli

    try:
        rc = lorakit.cli.main(req["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        rc = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc if isinstance(rc, int) else 1)


def main() -> None:
    requests, replies = os.dup(0), os.dup(1)
    # library prints in this process must not reach the protocol
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.dup2(2, 1)
    import importlib

    import matplotlib

    matplotlib.use("Agg")
    for name in PRELOAD:
        importlib.import_module(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 (lazy modules)

    rfile = os.fdopen(requests, "r")
    wfile = os.fdopen(replies, "w")
    for line in rfile:
        req = json.loads(line)
        if req["op"] == "spawn":
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(req, (requests, replies))
            reply = {"pid": pid}
        elif req["op"] == "poll":
            pid, raw = os.waitpid(req["pid"], os.WNOHANG)
            reply = {"status": None if pid == 0 else _status(raw)}
        elif req["op"] == "wait":
            reply = {"status": _status(os.waitpid(req["pid"], 0)[1])}
        else:
            reply = {"error": f"unknown op {req['op']!r}"}
        wfile.write(json.dumps(reply) + "\n")
        wfile.flush()


if __name__ == "__main__":
    main()
