"""`load_model`: a causal LM and its tokenizer, in a chosen dtype, optionally 4/8-bit quantized.

Sources, in order: no name -> the embedded default model (SmolLM2-135M-Instruct, converted once
into the lorakit cache); an existing local directory -> loaded from there; anything else is
treated as a Hugging Face Hub id, tried only when the hub is reachable (or already in the local
hub cache). `trust_remote_code` stays off unless the caller turns it on.

Quantization goes through transformers' `BitsAndBytesConfig`: with transformers 5.x and
bitsandbytes 0.50 it quantizes on CPU as well as on CUDA, layer by layer while the checkpoint is
read, and yields exactly the layers `lorakit.base.quantize.quantize_model` builds for an
in-memory model (same bits; tests/test_qlora.py checks this).
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from lorakit import compat
from lorakit.errors import InputNotFoundError, ModelFileError, UserError

from .default_model import default_model_dir, gguf_base_dir
from .gguf_base import is_gguf_file
from .quantize import QUANT_TYPES, report_unquantized_experts

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelNotFoundError(InputNotFoundError):
    """Neither a local model directory nor a hub id we can reach."""


class QuantizationUnsupportedError(UserError, RuntimeError):
    """bitsandbytes cannot run the requested quantization on this device."""


# ----------------------------------------------------------------------------------- dtype / device


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """None/"auto" -> the first CUDA device if there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cpuinfo_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has native bf16 matmul instructions (AVX512_BF16 or AMX-BF16).

    Linux: the `avx512_bf16` / `amx_bf16` flags of /proc/cpuinfo. Elsewhere (no /proc): torch's
    own CPU probes (`lorakit.compat.torch_cpu_has`). Plain
    AVX2/AVX512 CPUs emulate bf16 matmuls, slower than fp32, so they do not count; neither do
    ARM CPUs, where torch's bf16 kernels are not reliably faster than fp32 yet.
    """
    has = cpu_features()
    return has["avx512_bf16"] or has["amx_bf16"]


def _cpuinfo_value(key: str) -> str | None:
    """The first `key : value` line of /proc/cpuinfo (e.g. "model name"), or None."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None


# what the summary calls each /proc/cpuinfo flag; the bf16 ones decide the CPU paths (bf16
# autocast, bitsandbytes' tiled 4-bit layout), so a result is only comparable between machines
# that agree on them
CPU_FEATURES: dict[str, str] = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512-BF16",
    "amx_bf16": "AMX-BF16",
}


def cpu_features() -> dict[str, bool]:
    """Which of CPU_FEATURES this CPU has: /proc/cpuinfo flags, else torch's own CPU probes."""
    flags = _cpuinfo_flags()
    if flags:
        return {name: name in flags for name in CPU_FEATURES}
    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return {
        "avx2": capability in ("AVX2", "AVX512"),
        "avx512f": capability == "AVX512",
        "avx512_bf16": compat.torch_cpu_has("avx512_bf16"),
        "amx_bf16": compat.torch_cpu_has("amx_tile"),
    }


def machine_summary() -> str:
    """One line tying a test or benchmark result to its machine: CPU, vector features, whether
    training autocasts to bf16 by default, torch version and threads."""
    import platform

    cpu = _cpuinfo_value("model name") or platform.processor() or platform.machine()
    has = cpu_features()
    features = ", ".join(
        f"{label} {'yes' if has[flag] else 'no'}" for flag, label in CPU_FEATURES.items()
    )
    device = resolve_device(None)
    autocast = "on" if bf16_is_fast(device) else "off"
    return (
        f"CPU: {cpu} | {features} | bf16 autocast (training default, {device.type}): "
        f"{autocast} | torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def bf16_is_fast(device: str | torch.device | None = None) -> bool:
    """Whether `device` computes in bf16 natively (CUDA compute capability >= 8, or see
    `cpu_has_fast_bf16`). Other devices (MPS, XPU, ...) get fp32 from "auto"; ask explicitly."""
    device = resolve_device(device)
    if device.type == "cuda":
        try:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        except TypeError:  # older torch without the keyword
            return torch.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_dtype(
    dtype: str | torch.dtype = "auto", device: str | torch.device | None = None
) -> torch.dtype:
    """ "auto" -> bf16 where `device` computes it fast (see `bf16_is_fast`), else fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(
            f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16' or 'float16'"
        ) from None


# ------------------------------------------------------------------------------------ quantization


@functools.lru_cache(maxsize=None)
def _probe_quantization(quantization: str, device_type: str) -> str | None:
    """None if bitsandbytes runs `quantization` on `device_type`, else the reason it cannot."""
    try:
        bnb = compat.bitsandbytes()
    except ImportError as e:
        return f"bitsandbytes cannot be imported ({e.__cause__ or e})"
    from .quantize import quantize_model

    try:
        with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays untouched
            torch.manual_seed(0)
            probe = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(device_type)
            quantize_model(probe, quantization, compute_dtype=torch.float32, skip=())
            with torch.no_grad():
                probe(torch.randn(2, 64, device=device_type))
    except Exception as e:
        return (
            f"bitsandbytes {bnb.__version__} failed on a {device_type} test layer: "
            f"{type(e).__name__}: {e}"
        )
    return None


def check_quantization_supported(quantization: str, device: str | torch.device | None = None):
    """Raise `QuantizationUnsupportedError` unless bitsandbytes runs `quantization` on `device`."""
    if quantization not in QUANT_TYPES:
        raise ValueError(
            f"unknown quantization {quantization!r}; use None or one of {', '.join(QUANT_TYPES)}"
        )
    device = resolve_device(device)
    reason = _probe_quantization(quantization, device.type)
    if reason is not None:
        raise QuantizationUnsupportedError(
            f"quantization={quantization!r} is not available on {device.type}: {reason}"
        )


def bnb_config(quantization: str, compute_dtype: torch.dtype):
    """transformers `BitsAndBytesConfig` for our quantization names (NF4/FP4 with double quant;
    bitsandbytes' default 4-bit blocksize is 64 on CPU and CUDA)."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


# ------------------------------------------------------------------------------------------ source


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else can only be meant as a filesystem path.
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep != "/"
        and os.sep in name
        or os.path.exists(name)
    )


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """False in offline mode or when the hub's host name does not resolve (and no proxy is set).

    Without this check a missing network costs ~50 s of huggingface_hub retries before the
    error; resolving the name is enough to tell "no network" apart and sends nothing to the hub.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    if constants.is_offline_mode():
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # DNS may be the proxy's job
    host = urlparse(constants.ENDPOINT).hostname
    if not host:
        return False
    result: list[bool] = []

    def resolve():
        try:
            socket.getaddrinfo(host, 443)
            result.append(True)
        except OSError:
            result.append(False)

    t = threading.Thread(target=resolve, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout_s)
    return bool(result and result[0])


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _not_found(name: str, why: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"cannot load model {name!r}: {why}. Pass a local directory holding a transformers model "
        f"(config.json + weights), a .gguf file, a Hugging Face Hub id with the hub reachable, "
        f"or no name for the embedded default model."
    )


def resolve_source(name_or_path: str | os.PathLike | None) -> tuple[str, dict[str, Any]]:
    """(what to pass to from_pretrained, extra kwargs) for a model name, path or None."""
    if name_or_path is None:
        return str(default_model_dir()), {}
    name = os.fspath(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise _not_found(name, f"the directory {path} holds no config.json")
        return str(path), {}
    if path.is_file() and is_gguf_file(path):
        return str(gguf_base_dir(path)), {}
    if path.exists():
        raise _not_found(name, f"{path} is a file, neither a model directory nor a GGUF file")
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(name):
        raise _not_found(name, f"no such directory: {path.resolve()}")
    if hub_reachable():
        return name, {}
    # no hub: a model downloaded earlier still loads from the local hub cache
    return name, {"local_files_only": True}


# -------------------------------------------------------------------------------------- load_model


def _release_checkpoint_mapping(model) -> None:
    """Give non-quantized CPU parameters their own memory.

    transformers leaves parameters whose dtype matches the file (e.g. fp32 embeddings) as views
    of the memory-mapped safetensors file. After a quantized load, one such view keeps the whole
    mapping alive, and with it every page read for quantization: on SmolLM2-135M that is ~400 MiB
    of RSS for weights that now live in 4-bit form. A copy of the few remaining float tensors
    lets the mapping go. (Unquantized loads keep the mapping: there it *is* the weights.)
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for p in module.parameters(recurse=False):
                if id(p) in seen or p.device.type != "cpu" or not p.is_floating_point():
                    continue  # quantized weights are integer tensors, allocated by bitsandbytes
                seen.add(id(p))
                p.data = p.data.clone()  # in place on the Parameter: tied weights stay tied


def load_model(
    name_or_path: str | os.PathLike | None = None,
    dtype: str | torch.dtype = "auto",
    quantization: str | None = None,
    *,
    device: str | torch.device | None = None,
    compute_dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    tokenizer: bool = True,
    **from_pretrained_kwargs,
):
    """Load a causal LM and its tokenizer -> (model, tokenizer); the model is in eval mode.

    dtype: dtype of the (frozen) base weights, "auto" = bf16 where `device` computes it fast,
        else fp32 (see `resolve_dtype`). Adapters added later keep their own (fp32) dtype.
    quantization: None, "nf4" / "fp4" (bitsandbytes Linear4bit, double quantization, blocksize
        64) or "int8" (Linear8bitLt). Embeddings, norms and lm_head stay in `dtype`.
    compute_dtype: dtype 4-bit layers compute in; defaults to `dtype`.
    device: "cpu", "cuda", "cuda:1", ...; default: CUDA if available, else CPU.
    tokenizer: False to skip loading it (returns (model, None)).
    Extra keyword arguments go to `AutoModelForCausalLM.from_pretrained`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, trust_remote_code=trust_remote_code)
    if revision is not None:
        kwargs["revision"] = revision
    if quantization is not None:
        check_quantization_supported(quantization, device)
        cdtype = torch_dtype if compute_dtype is None else resolve_dtype(compute_dtype, device)
        kwargs["quantization_config"] = bnb_config(quantization, cdtype)
        # quantized weights cannot be moved afterwards: place them while loading
        kwargs["device_map"] = {"": device}
    elif compute_dtype is not None:
        raise ValueError("compute_dtype only applies to quantized models; use dtype instead")

    source, extra = resolve_source(name_or_path)
    kwargs.update(extra)
    kwargs.update(from_pretrained_kwargs)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tok = (
            AutoTokenizer.from_pretrained(
                source,
                trust_remote_code=trust_remote_code,
                **{k: v for k, v in kwargs.items() if k in ("revision", "local_files_only")},
            )
            if tokenizer
            else None
        )
    except Exception as e:
        if os.path.isdir(source):
            # transformers and safetensors report unreadable files as OSError, ValueError or
            # SafetensorError; a bug in lorakit keeps its traceback
            if isinstance(e, (OSError, ValueError)) or type(e).__name__ == "SafetensorError":
                raise ModelFileError(f"cannot load model {source!r}: {_first_line(e)}") from e
            raise
        if not isinstance(e, OSError):
            raise
        why = (
            "the hub is not reachable and it is not in the local hub cache"
            if extra.get("local_files_only")
            else f"the hub could not provide it ({e})"
        )
        raise _not_found(source, f"no such local directory, and {why}") from e
    if quantization is None and model.device != device:
        model.to(device)
    if quantization is not None:
        _release_checkpoint_mapping(model)
        compat.keep_regular_layouts(model)
        report_unquantized_experts(model)
    model.eval()
    if tok is not None and tok.pad_token is None and tok.eos_token is not None:
        # batched training needs a pad token; padded positions are masked out anyway
        tok.pad_token = tok.eos_token
    return model, tok
