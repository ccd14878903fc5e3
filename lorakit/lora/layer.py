"""The LoRA layer: one class for every base layer, one small object per adapter.

`LoraLayer` keeps the frozen base layer intact as `base_layer` (so unloading just puts it back)
and holds its adapters in a ModuleDict of `LoraAdapter`s. Backends (fp32/bf16 Linear, Conv1D,
bitsandbytes 4-bit) differ only in how the base weight is read/written for merging, which
`lorakit.lora.backends` answers; the forward pass simply calls the base layer.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from lorakit.lora import backends
from lorakit.lora.variants import LoraVariant


class LoraAdapter(nn.Module):
    """One adapter on one layer: A (r×in), B (out×r), dropout and scaling."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float, scaling: float,
                 dropout: float, variant: LoraVariant, dtype: torch.dtype,
                 device: torch.device | str | None) -> None:
        super().__init__()
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.variant = variant
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, init: bool | str) -> None:
        """True: Kaiming-uniform A, zero B (training starts at the base model).
        "gaussian": A ~ N(0, 1/r), zero B. False: both random (a non-identity adapter, for tests)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return self.variant.forward(self, x, result)

    def peft_tensors(self) -> dict[str, nn.Parameter]:
        """This adapter's parameters under PEFT's key suffixes."""
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        return self.variant.delta_weight(self, base_weight)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, variant={self.variant.name}"


class LoraLayer(nn.Module):
    """A frozen base layer plus named LoRA adapters; y = base(x) + Σ_active adapter(x)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        if not backends.is_supported(base_layer):
            raise TypeError(f"cannot wrap {type(base_layer).__name__} with LoRA")
        self.base_layer = base_layer
        self.adapters = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.in_features, self.out_features = backends.in_out_features(base_layer)

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, scaling: float, dropout: float,
                    init: bool | str, variant: LoraVariant, dtype: torch.dtype) -> LoraAdapter:
        device = self.base_layer.weight.device
        adapter = LoraAdapter(self.in_features, self.out_features, r, alpha, scaling, dropout,
                              variant, dtype, device)
        adapter.reset_parameters(init)
        self.adapters[name] = adapter
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.adapters[name](x, result)
        return result

    # -- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """W += ΔW for each adapter, computed in fp32 whatever the storage dtype."""
        names = self.active_adapters if names is None else names
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        weight = backends.dense_weight(self.base_layer)
        for name in names:
            weight += self.adapters[name].delta_weight(weight)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapters {names} would write NaN/inf into the base weight; "
                             "the layer is left unchanged")
        backends.write_dense_weight(self.base_layer, weight)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        names = list(self.merged_adapters) if names is None else names
        names = [n for n in names if n in self.merged_adapters]
        if not names:
            return
        weight = backends.dense_weight(self.base_layer)
        for name in reversed(names):
            weight -= self.adapters[name].delta_weight(weight)
        backends.write_dense_weight(self.base_layer, weight)
        self.merged_adapters = [n for n in self.merged_adapters if n not in names]

    def extra_repr(self) -> str:
        return f"active={self.active_adapters}, merged={self.merged_adapters}"


class ModulesToSave(nn.Module):
    """A module trained in full: the original stays frozen, each adapter gets its own copy."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)

    def set_active(self, names: list[str]) -> None:
        present = [n for n in names if n in self.copies]
        self.active_adapter = present[0] if present else None

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.copies[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.current(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # transformers reads attributes such as `.weight` of the module it expects to find here
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current, name)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: adapters off, merged adapters temporarily unmerged."""
    layers = [m for _, m in lora_layers(model)]
    saved = [m for _, m in saved_modules(model)]
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    for m in saved:
        m.disabled = True
    try:
        yield
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[id(layer)])
        for m in saved:
            m.disabled = False


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
