"""The compiled CPU kernel for mixed-adapter batches (decode_kernel.cpp), if it builds: the
LoRA update of decoding steps and prefills, each row with its own adapter.

`decode_kernel()` builds it with torch's extension builder the first time it is needed on a
machine (about half a minute on 2 cores, announced on stderr), caches the library under the
lorakit cache, and returns its function; it returns None where the kernel cannot be used (no C++
compiler, a failed build, or LORAKIT_DECODE_KERNEL=0), and the torch path computes the update
instead. `tile_kernel()` is its AMX variant, where the CPU and the OS provide the tiles. The
build is compiled for this CPU (-march=native), so the cache directory is keyed by the CPU's
feature flags as well as by the source and the torch version.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lorakit.base.default_model import lorakit_home

ENV = "LORAKIT_DECODE_KERNEL"  # "0": never build or use the kernel
_SOURCE = Path(__file__).with_name("decode_kernel.cpp")
_lock = threading.Lock()
_UNSET: object = object()
_kernel: Any = _UNSET  # the kernel's module once built, None if it failed to build


def decode_kernel() -> Callable[..., None] | None:
    """`lora_decode_(out, x, a, b_t, rows, cols)` (see decode_kernel.cpp), or None."""
    module = _module()
    return None if module is None else module.lora_decode_


def tile_kernel() -> Callable[..., None] | None:
    """`lora_tiles_(out, x, a_tiles, b_tiles, rows, cols)`: the same update with AMX tiles, on
    CPUs that have them (and an OS that grants them), else None."""
    module = _module()
    return module.lora_tiles_ if module is not None and module.tiles_available() else None


def _module() -> Any:
    global _kernel
    if os.environ.get(ENV, "1") == "0":
        return None
    if _kernel is _UNSET:  # one build (or one failure) per process
        with _lock:
            if _kernel is _UNSET:
                _kernel = build()
    return _kernel


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build_key(arch: str = "native") -> str:
    text = "\n".join([_SOURCE.read_text(), torch.__version__, sys.version, _cpu_flags(), arch])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build(arch: str = "native") -> Any:
    """Build (or load from the cache) the kernel's module for `-march=arch`; None if that fails.
    `decode_kernel()` uses "native"; tests build e.g. "x86-64-v3" (AVX2 only) to check the code
    another kind of CPU runs."""
    from torch.utils import cpp_extension

    name = f"lorakit_decode_{_build_key(arch)}"
    build_dir = lorakit_home() / "kernels" / name
    built = any(build_dir.glob(f"{name}*.so"))
    if not built:
        print(
            "lorakit: building the CPU decoding kernel for mixed-adapter batches "
            f"(once per machine, ~30 s) in {build_dir}",
            file=sys.stderr,
            flush=True,
        )
    start = time.time()
    old_path = os.environ.get("PATH", "")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        # torch's builder runs `ninja` from PATH; the ninja wheel's binary is not on it when
        # lorakit runs as .venv/bin/python without the virtual environment activated
        import ninja

        os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, old_path])
        module = cpp_extension.load(
            name=name,
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", f"-march={arch}", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_dir),
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, a compile error: decode with torch instead
        print(
            f"lorakit: the CPU decoding kernel did not build ({type(e).__name__}: "
            f"{str(e).strip().splitlines()[-1] if str(e).strip() else e!r}); mixed-adapter "
            f"decoding uses the slower torch path (set {ENV}=0 to skip the attempt)",
            file=sys.stderr,
            flush=True,
        )
        return None
    finally:
        os.environ["PATH"] = old_path
    if not built:
        print(f"lorakit: kernel built in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return module
