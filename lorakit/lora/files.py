"""Adapter files in the PEFT on-disk format.

A directory holds `adapter_config.json` (the LoraConfig, sorted keys) and
`adapter_model.safetensors` with PEFT's tensor names: "base_model.model." + the module path in
the transformers model + ".lora_A.weight" / ".lora_B.weight" (adapter name removed). Full copies
(modules_to_save) are stored under the original module's names, trained biases under the
parameter's own name (".base_layer.bias" inside a wrapped layer).
"""

from __future__ import annotations

import copy
import json
import math
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save

from lorakit.atomic import atomic_write_bytes
from lorakit.errors import ConfigError, InputNotFoundError, UserError
from lorakit.lora.config import LoraConfig
from lorakit.lora.layer import lora_layers, saved_modules
from lorakit.lora.params import ParamLoraLayer, param_layers
from lorakit.lora.pissa import to_lora_tensors
from lorakit.lora.targeting import without_unmatched

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


class AdapterModel(Protocol):
    """What reading and writing adapters needs of the model holding them (`LoraModel` is the
    one; this module sits below it)."""

    model: torch.nn.Module  # the transformers model, adapters injected
    peft_config: dict[str, LoraConfig]

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...

    def list_adapters(self) -> list[str]: ...


class AdapterMismatchError(UserError, ValueError):
    """An adapter whose tensors do not fit the base model it is loaded onto."""


class AdapterFileError(UserError, ValueError):
    """An adapter file that exists but cannot be read: truncated, a corrupt header, not a
    checkpoint of tensors. The message names the file and what is wrong with it."""


def adapter_dir(root: str | Path, adapter_name: str) -> Path:
    """Where an adapter lives in a saved directory: PEFT puts "default" at the root and every
    other adapter in a sub-directory of its name, which stays inside `root` (a plain name, not
    a symbolic link out of the tree)."""
    if adapter_name == "default":
        return Path(root)
    if adapter_name in ("", ".", "..") or Path(adapter_name).name != adapter_name:
        raise ConfigError(f"invalid adapter name {adapter_name!r}: a name, not a path")
    sub = Path(root) / adapter_name
    if sub.is_symlink() and not sub.resolve().is_relative_to(Path(root).resolve()):
        raise AdapterFileError(
            f"{sub} is a symbolic link out of {root}: adapters are read and written inside "
            "their directory"
        )
    return sub


def _reason(error: BaseException, limit: int = 160) -> str:
    """The first line of a library's error message, short enough for a one-line report."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def peft_parameters(lora_model: AdapterModel, adapter_name: str) -> dict[str, torch.nn.Parameter]:
    """PEFT key -> the live parameter, for everything one adapter saves (used both ways)."""
    config = lora_model.peft_config[adapter_name]
    model = lora_model.model
    params: dict[str, torch.nn.Parameter] = {}
    for name, layer in lora_layers(model):
        if adapter_name not in layer.adapters:
            continue
        for suffix, p in layer.adapters[adapter_name].peft_tensors().items():
            params[f"{PREFIX}{name}.{suffix}"] = p
        if config.bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
            params[f"{PREFIX}{name}.base_layer.bias"] = layer.base_layer.bias
    for name, layer in param_layers(model):
        params.update(_parameter_adapter_keys(name, layer, adapter_name))
    for name, module in saved_modules(model):
        if adapter_name in module.copies:
            for pname, p in module.copies[adapter_name].named_parameters():
                params[f"{PREFIX}{name}.{pname}"] = p
    if config.bias == "all":
        for pname, p in model.named_parameters():
            inside_adapter = (
                ".adapters." in pname or ".original_module." in pname or ".copies." in pname
            )
            if pname.endswith("bias") and not inside_adapter:
                params[f"{PREFIX}{pname}"] = p
    return params


def _parameter_adapter_keys(
    name: str, layer: ParamLoraLayer, adapter_name: str
) -> dict[str, torch.nn.Parameter]:
    """PEFT's keys for the adapters on a module's parameters: PEFT wraps each targeted
    parameter in its own wrapper, nested in the module's parameter order (the first one
    innermost), so the k-th of n sits under n-1-k ".base_layer" segments."""
    if adapter_name not in layer.adapters:
        return {}
    order = layer.parameters_of(adapter_name)
    keys = {}
    for k, param in enumerate(order):
        path = name + ".base_layer" * (len(order) - 1 - k)
        for suffix, p in layer.adapters[adapter_name][param].peft_tensors().items():
            keys[f"{PREFIX}{path}.{suffix}"] = p
    return keys


def save_adapter(
    lora_model: AdapterModel,
    directory: str | Path,
    adapter_name: str,
    initial_weights: dict[str, torch.Tensor] | None = None,
    convert_to_lora: bool = False,
) -> None:
    """Write one adapter as a PEFT adapter directory (weights first, then config; both atomic).

    convert_to_lora / initial_weights: write a PiSSA-style adapter (trained on a residual base)
    as a plain LoRA for the original base, relative to its initial A₀/B₀ — those kept from the
    PiSSA initialisation, or `initial_weights` (an adapter saved before training)."""
    directory = Path(directory)
    tensors = {
        k: p.detach().to("cpu").contiguous().clone()
        for k, p in peft_parameters(lora_model, adapter_name).items()
    }
    config = copy.deepcopy(lora_model.peft_config[adapter_name])
    config.inference_mode = True
    if convert_to_lora or initial_weights is not None:
        config = _convert_to_plain_lora(lora_model, adapter_name, tensors, config, initial_weights)
    atomic_write_bytes(directory / WEIGHTS_NAME, save(tensors, metadata={"format": "pt"}))
    atomic_write_bytes(directory / CONFIG_NAME, (config.to_json() + "\n").encode())


def _convert_to_plain_lora(
    lora_model: AdapterModel,
    adapter_name: str,
    tensors: dict[str, torch.Tensor],
    config: LoraConfig,
    initial: dict[str, torch.Tensor] | None,
) -> LoraConfig:
    """Rewrite `tensors` in place as the rank-2r LoRA B A − B₀ A₀; return the matching config
    (r and alpha doubled so the scaling is unchanged, as PEFT writes it)."""
    if config.use_dora:
        raise ValueError(
            f"adapter '{adapter_name}' uses DoRA, whose magnitude is relative to the "
            "residual base; it cannot be converted to a plain LoRA"
        )
    if config.use_rslora and (config.rank_pattern or config.alpha_pattern):
        raise ValueError(
            "converting an rsLoRA adapter with rank_pattern/alpha_pattern is not "
            "supported (no single alpha keeps every module's scaling)"
        )
    for name, layer in lora_layers(lora_model.model):
        if adapter_name not in layer.adapters:
            continue
        key_a, key_b = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        if initial is None:
            adapter = layer.adapters[adapter_name]
            a0, b0 = getattr(adapter, "pissa_A0", None), getattr(adapter, "pissa_B0", None)
            if a0 is None:
                raise ValueError(
                    f"adapter '{adapter_name}' was not PiSSA-initialised in this "
                    "process, so its initial A/B are unknown; pass "
                    "path_initial_model_for_weight_conversion instead"
                )
        else:
            if key_a not in initial or key_b not in initial:
                raise ValueError(f"the initial adapter has no weights for module '{name}'")
            a0, b0 = initial[key_a], initial[key_b]
        if a0.shape != tensors[key_a].shape or b0.shape != tensors[key_b].shape:
            raise ValueError(
                f"initial weights of module '{name}' have shapes "
                f"{tuple(a0.shape)}/{tuple(b0.shape)}, the adapter "
                f"{tuple(tensors[key_a].shape)}/{tuple(tensors[key_b].shape)}"
            )
        tensors[key_a], tensors[key_b] = to_lora_tensors(
            tensors[key_a], tensors[key_b], a0.cpu(), b0.cpu()
        )
    config = copy.deepcopy(config)
    config.r *= 2
    config.lora_alpha *= math.sqrt(2) if config.use_rslora else 2
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: 2 * v for k, v in config.alpha_pattern.items()}
    config.init_lora_weights = True
    return config


def adapted_modules(keys: Iterable[str]) -> set[str]:
    """The module paths (in the transformers model) that the tensor names `keys` of an adapter
    file give a LoRA pair to."""
    return {key.removeprefix(PREFIX).split(".lora_A.")[0] for key in keys if ".lora_A." in key}


def read_adapter_config(path: str | Path) -> LoraConfig:
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise InputNotFoundError(f"no {CONFIG_NAME} in {path}: not an adapter directory")
    try:
        return LoraConfig.from_json_file(str(file))
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"{file}: not valid JSON ({e})") from None
    except ConfigError as e:  # name the file: the field alone does not say which adapter
        raise ConfigError(f"{file}: {e}") from None


def read_adapter_weights(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors by PEFT name, from its .safetensors file; an old PEFT .bin (a
    pickle) only with `allow_pickle`, and then through torch.load(weights_only=True)."""
    path = Path(path)
    if (path / WEIGHTS_NAME).is_file():
        try:
            return load_file(str(path / WEIGHTS_NAME))
        except SafetensorError as e:  # truncated, or a header that is not safetensors JSON
            raise AdapterFileError(
                f"{path / WEIGHTS_NAME}: not a readable safetensors file "
                f"(truncated or corrupt: {_reason(e)})"
            ) from e
    if (path / LEGACY_WEIGHTS_NAME).is_file():
        if not allow_pickle:
            raise AdapterFileError(
                f"{path / LEGACY_WEIGHTS_NAME}: a pickle, which lorakit does not load unless "
                "asked to (allow_pickle=True, CLI --allow-pickle: read with "
                f"torch.load(weights_only=True)); or convert it to {WEIGHTS_NAME}"
            )
        return _read_legacy_weights(path / LEGACY_WEIGHTS_NAME)
    raise InputNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path}")


def _read_legacy_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        # old PEFT pickles: weights_only refuses anything but tensors, so no code can run
        weights = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # not a pickle, or one holding more than tensors
        raise AdapterFileError(
            f"{file}: not a PyTorch checkpoint of tensors (torch.load with "
            "weights_only=True refused it)"
        ) from e
    except (RuntimeError, EOFError, ValueError) as e:  # truncated zip, empty file, ...
        raise AdapterFileError(
            f"{file}: not a valid PyTorch checkpoint (truncated or corrupt: {_reason(e)})"
        ) from e
    if not isinstance(weights, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in weights.items()
    ):
        raise AdapterFileError(
            f"{file}: holds a {type(weights).__name__}, not a mapping of tensor names to tensors"
        )
    return weights


def read_weights_header(file: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in a .safetensors file, without reading the data."""
    try:
        with safe_open(str(file), "pt") as f:
            header = {}
            for key in f.keys():
                tensor = f.get_slice(key)
                header[key] = (tuple(tensor.get_shape()), str(tensor.get_dtype()))
            return header
    except SafetensorError as e:
        raise AdapterFileError(
            f"{file}: not a readable safetensors file (truncated or corrupt: {_reason(e)})"
        ) from e


def load_adapter(
    lora_model: AdapterModel,
    path: str | Path,
    adapter_name: str,
    is_trainable: bool = False,
    allow_pickle: bool = False,
) -> None:
    """Inject the adapter stored at `path` under `adapter_name` and copy its weights in
    (`allow_pickle`: see read_adapter_weights)."""
    config = read_adapter_config(path)
    config.inference_mode = not is_trainable
    weights = read_adapter_weights(path, allow_pickle=allow_pickle)
    install_adapter(lora_model, adapter_name, config, weights, path)


def install_adapter(
    lora_model: AdapterModel,
    adapter_name: str,
    config: LoraConfig,
    weights: dict[str, torch.Tensor],
    path: str | Path,
) -> None:
    """Add an adapter from its config and tensors already read from `path`; on a mismatch with
    the base the model is left as it was."""
    lora_model.add_adapter(adapter_name, without_unmatched(lora_model.model, config))
    try:
        _copy_weights(lora_model, adapter_name, weights, path)
    except Exception:
        lora_model.delete_adapter(adapter_name)
        raise


def load_adapter_weights(lora_model: AdapterModel, path: str | Path, adapter_name: str) -> None:
    """Copy saved weights into an adapter that already exists (e.g. resuming training)."""
    _copy_weights(lora_model, adapter_name, read_adapter_weights(path), path)


@torch.no_grad()
def _copy_weights(
    lora_model: AdapterModel, adapter_name: str, weights: dict[str, torch.Tensor], path: str | Path
) -> None:
    params = peft_parameters(lora_model, adapter_name)
    unexpected = sorted(set(weights) - set(params))
    if unexpected:
        raise AdapterMismatchError(
            f"{path}: {len(unexpected)} tensors match nothing in the model "
            f"(e.g. {unexpected[:3]}); is this adapter for another base model?"
        )
    missing = sorted(k for k in set(params) - set(weights) if ".lora_" in k)
    if missing:
        raise AdapterMismatchError(
            f"{path}: adapter weights are missing {len(missing)} tensors (e.g. {missing[:3]})"
        )
    for key, tensor in weights.items():
        target = params[key]
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: tensor {key} holds NaN or inf values")
        if target.shape != tensor.shape:
            module = key[len(PREFIX) :].rsplit(".", 2 if key.endswith(".weight") else 1)[0]
            rank_dim = 0 if ".lora_A." in key else 1 if ".lora_B." in key else None
            if rank_dim is not None and tensor.dim() == 2 and target.dim() == 2:
                other = 1 - rank_dim
                if tensor.shape[other] == target.shape[other]:  # the base fits; the rank not
                    raise AdapterMismatchError(
                        f"{path}: {CONFIG_NAME} gives module '{module}' rank "
                        f"{target.shape[rank_dim]}, its tensors have rank "
                        f"{tensor.shape[rank_dim]}: the config does not belong to these weights"
                    )
            raise AdapterMismatchError(
                f"{path}: tensor for module '{module}' ({key.rsplit('.', 2)[-2]}) has shape "
                f"{tuple(tensor.shape)} but the base model needs {tuple(target.shape)}; "
                "was this adapter trained on another base model?"
            )
        target.copy_(tensor.to(device=target.device, dtype=target.dtype))
