"""A GGUF file as a base model: converted once into a cached safetensors directory.

transformers reads GGUF (`from_pretrained(dir, gguf_file=name)`) by dequantizing every tensor,
which takes about a minute for a 135M model on 2 CPU cores. lorakit does that once per file and
loads the cached directory afterwards, for `--model file.gguf` as for the embedded default.
The cache key is the file's resolved path, size and modification time, so an edited or
replaced file is converted again.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

from lorakit.atomic import TMP_PREFIX, atomic_directory
from lorakit.errors import ModelFileError

_STALE_TMP_S = 6 * 3600  # a conversion takes about a minute; older leftovers are from killed runs


def is_gguf_file(path: Path) -> bool:
    """A file that starts with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def cache_name(gguf: Path) -> str:
    """The cache directory name of a GGUF file: its stem and a key of path, size and mtime."""
    stat = gguf.stat()
    key = f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()
    return f"{gguf.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def gguf_model_dir(gguf: Path, target: Path, what: str = "the model") -> Path:
    """`target`, a safetensors + tokenizer directory converted from `gguf`, converting it if it
    is not there yet.

    The conversion is written into a temporary sibling and renamed into place, so an
    interrupted conversion never leaves a half-written cache: the directory exists if and only
    if it is complete. Another process finishing the same conversion first is as good as us."""
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    with atomic_directory(target, keep_existing=True) as tmp:
        _convert_gguf(gguf, tmp, what)
    return target


def _is_complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _remove_stale_temp_dirs(target: Path) -> None:
    # A SIGKILLed conversion cannot run its cleanup; sweep its leftovers by age so that a
    # conversion running concurrently in another process is never touched.
    now = time.time()
    for p in target.parent.glob(f"{TMP_PREFIX}{target.name}.*"):
        try:
            if now - p.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


class _Progress:
    """Numbered stage lines on stderr with elapsed times (transformers adds its own tensor bar)."""

    def __init__(self, total: int):
        self.total, self.step, self.t0 = total, 0, time.time()

    def stage(self, text: str) -> None:
        self.step += 1
        print(
            f"lorakit: [{self.step}/{self.total}] {text} ({time.time() - self.t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )


def _convert_gguf(gguf: Path, out_dir: Path, what: str) -> None:
    print(
        f"lorakit: converting {what} {gguf.name} once into {out_dir.parent} "
        f"(about a minute per 100M parameters; later loads take about a second)",
        file=sys.stderr,
        flush=True,
    )
    progress = _Progress(total=4)
    try:
        tokenizer, dequantized = _read_gguf(gguf, progress)
    except (ValueError, KeyError, OSError, NotImplementedError) as e:
        # transformers names what it cannot read (an architecture, a tensor type) in the text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelFileError(f"cannot read {gguf} as a model: {first}") from e
    progress.stage("rebuilding a plain float32 model")
    model = _plain_copy(dequantized)
    del dequantized
    progress.stage(f"writing safetensors into {out_dir.parent}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    print(
        f"lorakit: {what} cached in {time.time() - progress.t0:.1f} s",
        file=sys.stderr,
        flush=True,
    )


def _read_gguf(gguf: Path, progress: _Progress):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=gguf.name)
    progress.stage("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    progress.stage("dequantizing the GGUF weights to float32")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kw)
    return tokenizer, model


def _plain_copy(dequantized):
    """transformers marks GGUF-loaded models as "quantized" and refuses to save them, although
    the weights are plain fp32 tensors by now: rebuild a plain model from the config. On the
    meta device that costs no memory and no random init; the real tensors are then assigned."""
    import torch
    from transformers import AutoModelForCausalLM

    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = dequantized.generation_config
    return model
