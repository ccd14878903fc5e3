"""`LoraModel`: a transformers causal LM with LoRA adapters injected, PEFT-style API.

Injection replaces each targeted layer by a `LoraLayer` that wraps it in place, so the wrapped
model keeps its class, its forward, its `generate`, and its module names (plus ".base_layer").
"""

from __future__ import annotations

import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from lorakit.base.modules import name_matches
from lorakit.errors import ConfigError
from lorakit.lora import backends, combine
from lorakit.lora.config import LoraConfig
from lorakit.lora.layer import (
    LoraLayer,
    ModulesToSave,
    adapter_layers,
    adapters_disabled,
    saved_modules,
    wrapped_modules,
)
from lorakit.lora.mixed import BASE_ADAPTER, AdapterMapping
from lorakit.lora.params import ParamLoraLayer, check_config, param_layers
from lorakit.lora.targeting import find_parameter_targets, find_targets, resolve_targets
from lorakit.lora.variants import variant_for

_ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


def validate_adapter_name(name: str) -> None:
    """Adapter names become module and directory names: keep them plain."""
    if (
        not isinstance(name, str)
        or not _ADAPTER_NAME.fullmatch(name)
        or name.startswith("lora_")
        or name in (BASE_ADAPTER, "base_layer", "original_module", "copies", "adapters")
    ):
        raise ConfigError(
            f"invalid adapter name {name!r}: use letters, digits, '_' and '-' (no path separators, "
            "no '.', not starting with 'lora_', not a reserved name)"
        )


class LoraModel(nn.Module):
    """A transformers model with LoRA adapters. `self.model` is the (modified in place) model."""

    def __init__(
        self,
        model: nn.Module,
        config: LoraConfig | None,
        adapter_name: str = "default",
        adapter_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self.adapter_dtype = adapter_dtype
        self.active_adapters: list[str] = []
        for p in model.parameters():
            p.requires_grad_(False)
        # 4-bit layers must stay differentiable and readable (bitsandbytes' CPU tiled layout is
        # neither): every one of them, targeted or not, is on the training graph
        backends.keep_regular_layouts(model)
        if config is not None:
            self.add_adapter(adapter_name, config)

    # -- pass-through to the wrapped model ----------------------------------------------------
    def forward(self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any) -> Any:
        """The wrapped model's forward; `adapter_names` (one per row, "__base__" for none) runs
        each row through its own adapter in one batched pass (inference only)."""
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self.mixed_adapter_batch(adapter_names, _batch_size(args, kwargs)):
            return self.model(*args, **kwargs)

    def generate(
        self, *args: Any, adapter_names: Sequence[str] | None = None, **kwargs: Any
    ) -> Any:
        """`generate` of the wrapped model; with `adapter_names`, each row keeps its adapter for
        every decoding step."""
        if adapter_names is None:
            return self.model.generate(*args, **kwargs)
        with self.mixed_adapter_batch(adapter_names, _batch_size(args, kwargs)):
            return self.model.generate(*args, **kwargs)

    @contextmanager
    def mixed_adapter_batch(
        self,
        adapter_names: Sequence[str],
        batch_size: int | None = None,
        keep_slots: bool = False,
    ) -> Iterator[None]:
        """Within the block, row i of every batch uses adapter `adapter_names[i]` ("__base__":
        the base model), by one `AdapterMapping` for every layer; generate's row repetition
        (beams, num_return_sequences) is followed. `keep_slots`: the layers keep their adapters
        stacked after the block, until adapters are added or deleted (for a caller that does
        not change adapter weights in place between blocks, e.g. the inference engine)."""
        modules = list(wrapped_modules(self.model))  # one walk (a server does this every few steps)
        layers = [m for m in modules if isinstance(m, (LoraLayer, ParamLoraLayer))]
        mapping = AdapterMapping(
            self._check_mixed_batch(adapter_names, batch_size, layers), keep_slots
        )
        try:
            for module in modules:
                module.set_mixed(mapping)
            yield
        finally:
            for module in modules:
                module.set_mixed(None)

    def clear_adapter_slots(self) -> None:
        """Drop the adapters the layers keep stacked for mixed batches (`keep_slots`): needed
        after adapter weights changed in place (an optimizer step, a copy) and before the next
        batch that keeps slots."""
        for _, layer in adapter_layers(self.model):
            layer.slot = None

    def _check_mixed_batch(
        self,
        adapter_names: Sequence[str],
        batch_size: int | None,
        layers: list[LoraLayer | ParamLoraLayer],
    ) -> list[str]:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names must be a list with one adapter name per row")
        names = list(adapter_names)
        if not names:
            raise ValueError("adapter_names is empty")
        if batch_size is not None and batch_size != len(names):
            raise ValueError(
                f"adapter_names has {len(names)} entries for a batch of {batch_size} "
                "rows; give one adapter name per row"
            )
        unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in self.peft_config})
        if unknown:
            raise ValueError(
                f"unknown adapter(s) {unknown} in adapter_names; have "
                f"{self.list_adapters()} (or '{BASE_ADAPTER}' for the base model)"
            )
        if self.model.training:
            raise ValueError(
                "adapter_names (mixed-adapter batches) is for inference; call model.eval() first"
            )
        if any(layer.merged_adapters for layer in layers):
            raise ValueError(
                "cannot mix adapters per row while adapters are merged into the "
                "base weights; call unmerge_adapter() first"
            )
        if any(layer.mixed is not None for layer in layers):
            raise RuntimeError("a mixed-adapter batch is already running on this model")
        return names

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    @property
    def base_model(self) -> nn.Module:
        return self.model

    def get_base_model(self) -> nn.Module:
        """The wrapped transformers model (PEFT's name), adapters still injected."""
        return self.model

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Inject a new adapter (inactive until `set_adapter`; the first one is made active)."""
        validate_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter '{adapter_name}' already exists")
        config = resolve_targets(self.model, config)
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = getattr(self.model, "name_or_path", None) or None
        targets = find_targets(self.model, config, config.target_modules)
        parameters = find_parameter_targets(self.model, config)
        if parameters:
            check_config(config)
        variant = variant_for(config.use_dora)
        for name in targets:
            module = self.model.get_submodule(name)
            if not isinstance(module, LoraLayer):
                if backends.is_fan_in_fan_out(module) and not config.fan_in_fan_out:
                    # as PEFT does, and says: Conv1D stores W transposed; the adapter's own
                    # config (a copy) records it, the caller's object is left as it was
                    warnings.warn(
                        f"fan_in_fan_out is False but {name} is a Conv1D; setting "
                        "fan_in_fan_out=True in this adapter's config",
                        stacklevel=3,
                    )
                    config.fan_in_fan_out = True
                module = LoraLayer(module)
                self.model.set_submodule(name, module)
            r, alpha = config.rank_and_alpha(name)
            module.add_adapter(
                adapter_name,
                r,
                alpha,
                config.scaling(r, alpha),
                config.lora_dropout,
                config.init_lora_weights,
                variant,
                self.adapter_dtype,
            )
        for name, param in parameters:
            self._add_parameter_adapter(adapter_name, config, name, param)
        for name in self._modules_to_save_names(config):
            module = self.model.get_submodule(name)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module)
                self.model.set_submodule(name, module)
            module.add_copy(adapter_name)
        self.peft_config[adapter_name] = config
        if not self.active_adapters:
            self.active_adapters = [adapter_name]
        self._apply_active()

    def _add_parameter_adapter(
        self, adapter_name: str, config: LoraConfig, name: str, param: str
    ) -> None:
        module = self.model.get_submodule(name)
        if not isinstance(module, ParamLoraLayer):
            module = ParamLoraLayer(module)
            self.model.set_submodule(name, module)
        r, alpha = config.rank_and_alpha(f"{name}.{param}")
        module.add_adapter(
            adapter_name,
            param,
            f"{name}.{param}",
            r,
            alpha,
            config.scaling(r, alpha),
            config.init_lora_weights,
            self.adapter_dtype,
        )

    def _modules_to_save_names(self, config: LoraConfig) -> list[str]:
        if not config.modules_to_save:
            return []
        from lorakit.lora.targeting import candidate_modules

        names = [
            n
            for n, m in candidate_modules(self.model)
            if n and name_matches(n, config.modules_to_save)
        ]
        missing = [s for s in config.modules_to_save if not any(name_matches(n, s) for n in names)]
        if missing:
            raise ConfigError(
                f"modules_to_save: no module named {missing} in {type(self.model).__name__}"
            )
        return names

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make these adapters active: they run in forward and are the trainable ones."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; have {self.list_adapters()}")
        self.active_adapters = names
        self._apply_active()

    @property
    def active_adapter(self) -> str:
        return self.active_adapters[0]

    def list_adapters(self) -> list[str]:
        return list(self.peft_config)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise ValueError(f"unknown adapter '{adapter_name}'; have {self.list_adapters()}")
        for _, layer in adapter_layers(self.model):
            if adapter_name in layer.adapters:
                layer.delete_adapter(adapter_name)
        for _, module in saved_modules(self.model):
            if adapter_name in module.copies:
                del module.copies[adapter_name]
        del self.peft_config[adapter_name]
        self.active_adapters = [a for a in self.active_adapters if a != adapter_name]
        if not self.active_adapters and self.peft_config:
            self.active_adapters = [next(iter(self.peft_config))]
        self._apply_active()

    def _apply_active(self) -> None:
        """Route forward through the active adapters and make exactly their parameters trainable."""
        for _, layer in adapter_layers(self.model):
            layer.set_active(self.active_adapters)
        for _, module in saved_modules(self.model):
            module.set_active(self.active_adapters)
        self._mark_trainable()

    def _mark_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for name in self.active_adapters:
            config = self.peft_config[name]
            if config.inference_mode:
                continue
            for _, layer in adapter_layers(self.model):
                if name in layer.adapters:
                    layer.adapters[name].requires_grad_(True)
                    if (
                        config.bias == "lora_only"
                        and getattr(layer.base_layer, "bias", None) is not None
                    ):
                        layer.base_layer.bias.requires_grad_(True)
            for _, module in saved_modules(self.model):
                if name in module.copies:
                    module.copies[name].requires_grad_(True)
            if config.bias == "all":
                for pname, p in self.model.named_parameters():
                    if pname.endswith("bias") and ".adapters." not in pname:
                        p.requires_grad_(True)

    # -- counting -----------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; a 4-bit packed weight counts as its real size."""
        trainable = total = 0
        for p in self.model.parameters():
            n = p.numel() * (2 if backends.is_packed_4bit(p) else 1)
            total += n
            trainable += n if p.requires_grad else 0
        return trainable, total

    def expert_adapter_summary(self) -> str | None:
        """What the adapters on parameters (target_parameters: experts, routers) train, in one
        line, or None if there are none: the report shows the experts are adapted."""
        experts = routers = count = 0
        for _, layer in param_layers(self.model):
            for adapters in layer.adapters.values():
                for adapter in adapters.values():
                    if adapter.lora_A.requires_grad:
                        count += adapter.lora_A.numel() + adapter.lora_B.numel()
                        experts += adapter.shape.experts if adapter.shape.ndim == 3 else 0
                        routers += adapter.shape.ndim == 2
        if not experts + routers:
            return None
        return (
            f"of which on Mixture-of-Experts weights: {count:,} params "
            f"({experts:,} expert matrices, {routers:,} routers)"
        )

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,} || all params: {total:,} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )
        if experts := self.expert_adapter_summary():
            print(experts)

    # -- merge / disable ----------------------------------------------------------------------
    def merge_adapter(
        self, adapter_names: list[str] | None = None, safe_merge: bool = False
    ) -> None:
        """Fold the (active) adapters into the base weights; forward then costs nothing extra."""
        self._warn_if_lossy_merge()
        for _, layer in adapter_layers(self.model):
            layer.merge(adapter_names, safe_merge=safe_merge)

    def unmerge_adapter(self) -> None:
        for _, layer in adapter_layers(self.model):
            layer.unmerge()

    def merge_and_unload(
        self, safe_merge: bool = False, adapter_names: list[str] | None = None
    ) -> nn.Module:
        """Merge, then return the plain transformers model (same class as the base)."""
        self.merge_adapter(adapter_names, safe_merge=safe_merge)
        return self.unload(_merged=True)

    def unload(self, _merged: bool = False) -> nn.Module:
        """Remove every adapter and return the base model (unmerged adapters are discarded)."""
        for name, layer in list(adapter_layers(self.model)):
            if layer.merged_adapters and not _merged:
                layer.unmerge()
            self.model.set_submodule(name, layer.base_layer)
        for name, module in list(saved_modules(self.model)):
            # a merged model keeps the trained copy; a plain unload restores the original
            keep = (
                module.copies[module.active_adapter]
                if _merged and module.active_adapter
                else module.original_module
            )
            self.model.set_submodule(name, keep)
        model = self.model
        self.peft_config.clear()
        return model

    @contextmanager
    def disable_adapters(self) -> Iterator[None]:
        """`with model.disable_adapters():` runs the base model (merged adapters unmerged)."""
        with adapters_disabled(self.model):
            yield

    disable_adapter = disable_adapters  # PEFT's name for the same context manager

    def _warn_if_lossy_merge(self) -> None:
        if any(backends.is_linear4bit(layer.base_layer) for _, layer in adapter_layers(self.model)):
            warnings.warn(
                "merging into a 4-bit base re-quantizes the weights, which is lossy; "
                "prefer exporting a merged bf16/fp32 model",
                stacklevel=3,
            )

    # -- files --------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        path_initial_model_for_weight_conversion: str | Path | None = None,
        convert_pissa_to_lora: bool = False,
    ) -> None:
        """PEFT layout: 'default' at the root, every other adapter in <dir>/<name>/.

        A PiSSA adapter needs the residual base it was trained on. To use it on the original base
        instead, save it as a plain rank-2r LoRA: `convert_pissa_to_lora=True` uses the initial
        A/B kept since initialisation (every selected PiSSA adapter is converted);
        `path_initial_model_for_weight_conversion` (PEFT's option) reads them from an adapter
        saved before training (one adapter at a time)."""
        from lorakit.lora.files import adapter_dir, read_adapter_weights, save_adapter
        from lorakit.lora.pissa import is_pissa

        names = selected_adapters or self.list_adapters()
        unknown = [n for n in names if n not in self.peft_config]
        if unknown:
            raise ValueError(f"unknown adapter(s) {unknown}; have {self.list_adapters()}")
        initial = None
        if path_initial_model_for_weight_conversion is not None:
            if len(names) != 1:
                raise ValueError(
                    "path_initial_model_for_weight_conversion holds one adapter's "
                    f"initial weights; select one adapter (have {names})"
                )
            initial = read_adapter_weights(path_initial_model_for_weight_conversion)
        for name in names:
            sub = adapter_dir(save_directory, name)
            convert = convert_pissa_to_lora and is_pissa(self.peft_config[name].init_lora_weights)
            save_adapter(self, sub, name, initial_weights=initial, convert_to_lora=convert)

    # A new (inactive) adapter combining adapters with weights: "cat" (exact), "svd" (its best
    # rank-svd_rank approximation) or "linear" (PEFT's A/B mix); see lorakit.lora.combine
    add_weighted_adapter = combine.add_weighted_adapter

    def load_adapter(
        self,
        path: str | Path,
        adapter_name: str,
        is_trainable: bool = False,
        allow_pickle: bool = False,
    ) -> None:
        """`allow_pickle`: also read an old PEFT adapter_model.bin (torch.load, weights only)."""
        from lorakit.lora.files import load_adapter

        load_adapter(self, path, adapter_name, is_trainable=is_trainable, allow_pickle=allow_pickle)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        path: str | Path,
        adapter_name: str = "default",
        is_trainable: bool = False,
        adapter_dtype: torch.dtype = torch.float32,
        allow_pickle: bool = False,
    ) -> "LoraModel":
        """Load an adapter directory written by lorakit or PEFT onto `model` (`allow_pickle`:
        also an old PEFT adapter_model.bin, read with torch.load(weights_only=True))."""
        lora = cls(model, None, adapter_dtype=adapter_dtype)
        lora.load_adapter(path, adapter_name, is_trainable=is_trainable, allow_pickle=allow_pickle)
        lora.set_adapter(adapter_name)
        return lora


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for x in (
        kwargs.get("input_ids"),
        kwargs.get("inputs_embeds"),
        kwargs.get("inputs"),
        args[0] if args else None,
    ):
        if isinstance(x, torch.Tensor):
            return x.shape[0]
    return None


def get_lora_model(
    model: nn.Module,
    config: LoraConfig,
    adapter_name: str = "default",
    adapter_dtype: torch.dtype = torch.float32,
) -> LoraModel:
    """Freeze `model`, inject the adapters `config` describes, and return the LoraModel.

    Adapter weights are kept in `adapter_dtype` (fp32 by default) whatever the base dtype.
    bitsandbytes 4-bit layers are kept on their regular layout: on AVX512-BF16 CPUs
    bitsandbytes would repack them at a no-grad eval forward into an inference-only layout
    without a backward pass (`lorakit.compat`); one already repacked is restored exactly.
    """
    return LoraModel(model, config, adapter_name=adapter_name, adapter_dtype=adapter_dtype)
