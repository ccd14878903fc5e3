"""Which modules of a model a `LoraConfig` adapts (PEFT's matching rules, restated)."""

from __future__ import annotations

import copy
import re
import warnings
from typing import Iterator

from torch import nn

from lorakit import compat
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
    from lorakit.lora.params import ParamLoraLayer

    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s) for s in skip):
            continue
        yield name, module
        if isinstance(module, (LoraLayer, ModulesToSave, ParamLoraLayer)):
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


def expert_parameters(model: nn.Module) -> list[str]:
    """Full names of the Mixture-of-Experts weights fused into 3-D parameters (transformers 5:
    `mlp.experts.gate_up_proj` [experts, 2·inter, hidden], `down_proj`)."""
    return [
        f"{name}.{pname}"
        for name, module in parameter_holders(model)
        if _is_experts(module)
        for pname, p in module.named_parameters(recurse=False)
        if p.ndim == 3
    ]


def _is_experts(module: nn.Module) -> bool:
    # transformers flags the experts modules it describes (is_transposed); older or custom ones
    # are named so (Llama4TextExperts, JetMoeParallelExperts). Other 3-D parameters (RWKV's
    # time mixing, XLNet's attention) are not layers "all-linear" would name.
    return hasattr(module, "is_transposed") or "experts" in type(module).__name__.lower()


def expert_weights(model: nn.Module) -> list[str]:
    """The expert parameters and the routers beside them (custom modules holding a 2-D
    `weight`): what PEFT adapts as target_parameters and lorakit's linear layers cannot."""
    experts = expert_parameters(model)
    blocks = {name.rsplit(".", 2)[0] for name in experts}  # "model.layers.0.mlp"
    routers = [
        f"{name}.weight"
        for name, module in parameter_holders(model)
        if name.rpartition(".")[0] in blocks
        and not isinstance(module, nn.Embedding)
        and not _is_linear_like(module)
        and getattr(getattr(module, "weight", None), "ndim", 0) == 2
    ]
    return experts + routers


def parameter_holders(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every module that holds parameters of its own, a `ParamLoraLayer`
    standing for the module it wraps (under the wrapped module's name)."""
    from lorakit.lora.params import ParamLoraLayer

    for name, module in candidate_modules(model):
        yield name, module.base_layer if isinstance(module, ParamLoraLayer) else module


# transformers 5 fused the experts of these MoE families (v4 nn.Linear layers, still the names
# people and old adapters target) into parameters; PEFT maps the old names to the new ones, and
# its "all-linear" includes them, so the experts and routers of these families are adapted.
_MOE_V4_NAMES = {
    "mixtral": {
        "gate": "gate.weight",
        "w1": "gate_up_proj",
        "w3": "gate_up_proj",
        "w2": "down_proj",
    },
    "qwen2_moe": {
        "gate": "gate.weight",
        "gate_proj": "gate_up_proj",
        "up_proj": "gate_up_proj",
        "down_proj": "down_proj",
    },
}
_FUSED = "gate_up_proj"  # two v4 layers in one parameter: rank and alpha double, as in PEFT


def resolve_targets(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """A copy of `config` as PEFT saves it for `model`: 'all-linear' expanded to full names; on
    the MoE families above, the old expert and router names moved to target_parameters (with
    the fused parameter's doubled rank and alpha). 'all-linear' that would leave expert weights
    frozen fails, naming them."""
    config = copy.deepcopy(config)
    all_linear = config.target_modules == ALL_LINEAR
    if all_linear:
        config.target_modules = sorted(linear_module_names(model))
    family = compat.moe_conversion_pattern(
        getattr(getattr(model, "config", None), "model_type", None)
    )
    old_names = _MOE_V4_NAMES.get(family)
    if old_names is not None and isinstance(config.target_modules, list):
        asked = set(config.target_parameters or [])
        extra = list(old_names) if all_linear else []
        _convert_moe_targets(config, config.target_modules + extra, old_names)
        if all_linear:  # what all-linear added is what the model has (HunYuan has no gate.weight)
            keys = parameter_keys(model)
            config.target_parameters = [
                t
                for t in config.target_parameters or []
                if t in asked or _parameter_matches_any(t, keys)
            ] or None
    if all_linear:
        _check_experts_covered(model, config)
    return config


def parameter_keys(model: nn.Module) -> list[str]:
    """ "<module>.<parameter>" of every parameter, as target_parameters are matched against."""
    return [
        f"{name}.{pname}"
        for name, module in parameter_holders(model)
        for pname, _ in module.named_parameters(recurse=False)
    ]


def without_unmatched(model: nn.Module, config: LoraConfig) -> LoraConfig:
    """`config` without the target_modules / target_parameters list entries that match nothing
    in `model`: a saved adapter's config may list them (PEFT checks that something matched, not
    each entry), and its tensors say what it adapts."""
    config = copy.deepcopy(config)
    if isinstance(config.target_modules, list):
        names = [n for n, _ in candidate_modules(model) if n]
        config.target_modules = [
            t for t in config.target_modules if any(name_matches(n, [t]) for n in names)
        ]
    if config.target_parameters:
        keys = parameter_keys(model)
        kept = [t for t in config.target_parameters if _parameter_matches_any(t, keys)]
        config.target_parameters = kept or None
    return config


def _convert_moe_targets(config: LoraConfig, targets: list[str], old_names: dict) -> None:
    params, modules, fused = set(config.target_parameters or []), [], set()
    for target in targets:
        old = next((o for o in old_names if target == o or target.endswith(f".{o}")), None)
        if old is None:
            modules.append(target)
            continue
        params.add(old_names[old])
        if old_names[old] == _FUSED:
            fused.add(old)
    parts = {o for o, n in old_names.items() if n == _FUSED}
    if fused and fused != parts:
        raise ConfigError(
            f"target_modules names {sorted(fused)} but not {sorted(parts - fused)}: transformers 5 "
            f"fuses them into one parameter, {_FUSED}; target both (or target_parameters="
            f"['{_FUSED}'])"
        )
    if fused:
        key = rf".*\.{_FUSED}"
        config.rank_pattern.setdefault(key, config.r * len(parts))
        config.alpha_pattern.setdefault(key, config.lora_alpha * len(parts))
    config.target_modules = modules
    config.target_parameters = sorted(params) or None


def _check_experts_covered(model: nn.Module, config: LoraConfig) -> None:
    frozen = [
        n for n in expert_parameters(model) if not _parameter_matches(n, config.target_parameters)
    ]
    if frozen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in frozen})
        holder = model.get_submodule(frozen[0].rsplit(".", 1)[0])
        holder = getattr(holder, "base_layer", holder)
        fix = (
            f"Add target_parameters={leaves} to adapt them too"
            if hasattr(holder, "is_transposed")
            else f"lorakit does not know the layout of {type(holder).__name__}'s weights, so it "
            "cannot adapt them"
        )
        raise ConfigError(
            f"target_modules='all-linear' on {type(model).__name__} would leave its "
            f"Mixture-of-Experts weights frozen ({', '.join(frozen[:3])}"
            f"{', ...' if len(frozen) > 3 else ''}): they are not linear layers, and PEFT's "
            "all-linear adapts them only on the families it converts (Mixtral, Qwen3-MoE, OLMoE, "
            f"...). {fix}; or name the linear layers to adapt the attention only"
        )


def _parameter_matches(key: str, targets: list[str] | None) -> bool:
    # PEFT's rule: the full "<module>.<parameter>" name equals an entry or ends with ".<entry>"
    return any(key == t or key.endswith(f".{t}") for t in targets or [])


def find_parameter_targets(model: nn.Module, config: LoraConfig) -> list[tuple[str, str]]:
    """(module name, parameter name) of every parameter `config.target_parameters` adapts; an
    entry that matches nothing fails, listing the parameters the model does have."""
    if not config.target_parameters:
        return []
    if config.layers_to_transform is not None or config.exclude_modules:
        # PEFT matches target_parameters by name alone: an adapter file must hold the same
        # tensors whichever library wrote it, so lorakit does too, and says so
        warnings.warn(
            "layers_to_transform and exclude_modules apply to target_modules only (as in PEFT); "
            "target_parameters match by name alone: name the layers' parameters in full (e.g. "
            "'model.layers.1.mlp.experts.down_proj') to adapt some layers' experts",
            stacklevel=4,
        )
    found: list[tuple[str, str]] = []
    for name, module in parameter_holders(model):
        for pname, _ in module.named_parameters(recurse=False):
            if _parameter_matches(f"{name}.{pname}", config.target_parameters):
                found.append((name, pname))
    keys = [f"{m}.{p}" for m, p in found]
    missing = [t for t in config.target_parameters if not _parameter_matches_any(t, keys)]
    if missing:
        have = sorted(
            {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in expert_weights(model)}
        )
        raise ConfigError(
            f"target_parameters={missing!r} matches no parameter of {type(model).__name__}"
            + (
                f"; its expert weights and routers are: {have}"
                if have
                else " (it has no Mixture-of-Experts weights)"
            )
        )
    return found


def _parameter_matches_any(target: str, keys: list[str]) -> bool:
    return any(_parameter_matches(k, [target]) for k in keys)


def _in_layers(name: str, config: LoraConfig) -> bool:
    if config.layers_to_transform is None:
        return True
    idx = _layer_index(name, config.layers_pattern)
    wanted = config.layers_to_transform
    wanted = [wanted] if isinstance(wanted, int) else wanted
    return idx is not None and idx in wanted


# Mamba's fused kernels read these layers' weights directly, so an adapter on them would be
# bypassed: PEFT refuses them on these model types, and so does lorakit
_MAMBA_TYPES = ("falcon_h1", "mamba", "mamba2", "falcon_mamba", "nemotron_h")
_MAMBA_BYPASSED = ("out_proj", "conv1d")


def _check_not_bypassed(model: nn.Module, name: str) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in _MAMBA_TYPES and name.rsplit(".", 1)[-1] in _MAMBA_BYPASSED:
        raise ConfigError(
            f"target module '{name}': {_MAMBA_BYPASSED} of Mamba-based models "
            f"(model_type '{model_type}') are read directly by Mamba's fused kernels, which "
            "would bypass an adapter (PEFT refuses them too); leave them out of target_modules "
            "(with 'all-linear': exclude_modules=['out_proj'])"
        )


def find_targets(model: nn.Module, config: LoraConfig, targets: TargetSpec) -> list[str]:
    """Names of the modules to wrap, or a ValueError that lists what the model does have."""
    if not targets:  # parameters only (target_parameters)
        return []
    save = config.modules_to_save or []
    found: list[str] = []
    if isinstance(targets, list):
        names = [n for n, _ in candidate_modules(model) if n]
        if missing := [t for t in targets if not any(name_matches(n, [t]) for n in names)]:
            available = sorted({n.rsplit(".", 1)[-1] for n in linear_module_names(model)})
            raise ConfigError(
                f"target_modules={missing!r} matches no module of {type(model).__name__}; "
                f"its linear layers are named: {available}"
            )
    for name, module in candidate_modules(model):
        if not name or not _name_matches(targets, name):
            continue
        if _name_matches(config.exclude_modules, name):
            continue
        # An adapter inside a fully-trained copy would fight with it (PEFT refuses it too).
        if any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in save):
            continue
        if not _in_layers(name, config):
            continue
        _check_not_bypassed(model, name)
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
