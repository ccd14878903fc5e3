"""Which modules of a model a `LoraConfig` adapts (PEFT's matching rules, restated)."""

from __future__ import annotations

import re
from typing import Iterator

from torch import nn

from lorakit.base.modules import name_matches
from lorakit.errors import ConfigError
from lorakit.lora import backends
from lorakit.lora.config import ALL_LINEAR, LoraConfig, TargetSpec


def _name_matches(spec: TargetSpec, name: str) -> bool:
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return name_matches(name, spec)


def _layer_index(name: str, layers_pattern: list[str] | str | None) -> int | None:
    # The first numbered path segment is the layer index ("model.layers.3.mlp.up_proj" -> 3),
    # or the one after a given layers_pattern name ("h", "layers", "blocks", ...).
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in patterns:
            m = re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", name)
            if m:
                break
    return int(m.group("idx")) if m else None


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module that is not inside a lorakit wrapper."""
    from lorakit.lora.layer import LoraLayer, ModulesToSave

    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        yield name, module
        if isinstance(module, (LoraLayer, ModulesToSave)):
            skip.append(name + ".")


def _is_linear_like(module: nn.Module) -> bool:
    from lorakit.lora.layer import LoraLayer

    return isinstance(module, LoraLayer) or backends.is_supported(module)


def output_embedding_name(model: nn.Module) -> str | None:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if get is not None else None
    if out is None:
        return None
    for name, module in model.named_modules():
        if module is out:
            return name
    return None


def linear_module_names(model: nn.Module) -> list[str]:
    """Full names of every adaptable linear layer, output embedding excluded (= 'all-linear')."""
    from lorakit.lora.layer import ModulesToSave

    head = output_embedding_name(model)
    names = []
    for name, module in candidate_modules(model):
        if isinstance(module, ModulesToSave):
            continue
        if _is_linear_like(module) and name != head and name:
            names.append(name)
    return names


def expert_weights(model: nn.Module) -> list[str]:
    """Full names of the Mixture-of-Experts weights that are not linear layers: the experts'
    fused 3-D parameters (transformers 5: `mlp.experts.gate_up_proj` [experts, 2·inter, hidden],
    `down_proj`) and the routers beside them (custom modules holding a 2-D `weight`). PEFT's
    "all-linear" adapts them through `target_parameters` on the model types transformers converts
    (Mixtral, Qwen3-MoE, OLMoE, ...; not Qwen2-MoE); lorakit's layers cannot wrap them."""
    experts = [
        f"{name}.{pname}"
        for name, module in model.named_modules()
        if not isinstance(module, nn.modules.conv._ConvNd)
        for pname, p in module.named_parameters(recurse=False)
        if p.ndim == 3
    ]
    blocks = {name.rsplit(".", 2)[0] for name in experts}  # "model.layers.0.mlp"
    routers = [
        f"{name}.weight"
        for name, module in model.named_modules()
        if name.rpartition(".")[0] in blocks
        and not isinstance(module, nn.Embedding)
        and not _is_linear_like(module)
        and getattr(getattr(module, "weight", None), "ndim", 0) == 2
    ]
    return experts + routers


def resolve_target_modules(model: nn.Module, config: LoraConfig) -> TargetSpec:
    """The config's target spec with 'all-linear' expanded to full names (as PEFT saves it).
    'all-linear' on a Mixture-of-Experts model fails, naming the expert weights it would leave
    frozen: lorakit does not adapt them yet, and adapting the attention alone must be asked for."""
    if config.target_modules != ALL_LINEAR:
        return config.target_modules
    names = sorted(linear_module_names(model))
    if frozen := expert_weights(model):
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(
            f"target_modules='all-linear' on {type(model).__name__} means its Mixture-of-Experts "
            f"weights too ({', '.join(frozen[:3])}{', ...' if len(frozen) > 3 else ''}; PEFT "
            "adapts those of Mixtral, Qwen3-MoE, OLMoE and others as target_parameters), which "
            "lorakit cannot adapt yet: they would stay frozen. Name the layers to adapt instead, "
            f"e.g. target_modules={leaves} (the linear layers only)"
        )
    return names


def find_targets(model: nn.Module, config: LoraConfig, targets: TargetSpec) -> list[str]:
    """Names of the modules to wrap, or a ValueError that lists what the model does have."""
    save = config.modules_to_save or []
    found: list[str] = []
    for name, module in candidate_modules(model):
        if not name or not _name_matches(targets, name):
            continue
        if _name_matches(config.exclude_modules, name):
            continue
        # An adapter inside a fully-trained copy would fight with it (PEFT refuses it too).
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in save):
            continue
        if config.layers_to_transform is not None:
            idx = _layer_index(name, config.layers_pattern)
            wanted = config.layers_to_transform
            wanted = [wanted] if isinstance(wanted, int) else wanted
            if idx is None or idx not in wanted:
                continue
        if not _is_linear_like(module):
            raise ConfigError(
                f"target module '{name}' is a {type(module).__name__}; lorakit adapts nn.Linear "
                "and Conv1D layers only (train other modules fully with modules_to_save)"
            )
        found.append(name)
    if not found:
        available = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
        raise ConfigError(
            f"target_modules={config.target_modules!r} matches no module of "
            f"{type(model).__name__}; its linear layers are named: {available} "
            "(or use target_modules='all-linear')"
        )
    return found
