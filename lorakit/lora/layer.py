"""The LoRA layer: one class for every base layer, one small object per adapter.

`LoraLayer` keeps the frozen base layer intact as `base_layer` (so unloading just puts it back)
and holds its adapters in a ModuleDict of `LoraAdapter`s. Backends (fp32/bf16 Linear, Conv1D,
bitsandbytes 4-bit) differ only in how the base weight is read/written for merging, which
`lorakit.lora.backends` answers; the forward pass is the base layer's plus the adapters' update.
In a mixed-adapter batch (each row its own adapter, `lorakit.lora.mixed`) that update is the
batch's, and the layer keeps its adapters stacked in a slot between such batches.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from lorakit.lora import backends
from lorakit.lora.mixed import AdapterMapping, AdapterStack, LayerUpdate
from lorakit.lora.params import ParamLoraLayer
from lorakit.lora.pissa import is_pissa, pissa_init
from lorakit.lora.variants import LoraVariant


class LoraAdapter(nn.Module):
    """One adapter on one layer: A (r×in), B (out×r), dropout, scaling, and its variant (which may
    add tensors of its own, e.g. DoRA's magnitude)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        variant: LoraVariant,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.variant = variant
        self.lora_A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, dtype=dtype, device=device))
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, init: bool | str, base_layer: nn.Module | None = None) -> None:
        """True: Kaiming-uniform A, zero B (training starts at the base model).
        "gaussian": A ~ N(0, 1/r), zero B. False: both random (a non-identity adapter, for tests).
        "pissa" / "pissa_niter_<n>": from the base weight's SVD (rewrites `base_layer`).
        Then the variant sets up what it derives from A, B and the base weight.

        The random numbers are PEFT's, in PEFT's order, so that the same seed gives the same
        adapter as PEFT: PEFT builds A and B as `nn.Linear` layers (fp32, on the CPU), whose
        constructors draw a Kaiming-uniform init each, and then draws A again (or keeps both
        for init False)."""
        a = torch.empty(self.lora_A.shape)
        b = torch.empty(self.lora_B.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        if is_pissa(init):
            if base_layer is None:
                raise ValueError("PiSSA initialisation needs the base layer")
            pissa_init(self, base_layer, init)
        else:
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r)
            elif init is not False:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_A.copy_(a)
            if init is False:
                self.lora_B.copy_(b)
            else:
                nn.init.zeros_(self.lora_B)
        if base_layer is not None:
            self.variant.init(self, base_layer)

    def forward(self, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        return self.variant.forward(self, x, result, base_layer)

    def peft_tensors(self) -> dict[str, nn.Parameter]:
        """This adapter's parameters under PEFT's key suffixes."""
        return {
            "lora_A.weight": self.lora_A,
            "lora_B.weight": self.lora_B,
            **self.variant.peft_tensors(self),
        }

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """What merging this adapter alone adds to the dense fp32 (out, in) `base_weight`."""
        return self.variant.delta_weight(self, base_weight)

    def extra_repr(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, variant={self.variant.name}"
        )


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
        self.mixed: LayerUpdate | None = None  # set for the duration of a mixed-adapter batch
        self.slot: AdapterStack | None = None  # all the adapters stacked, kept between batches
        self.in_features, self.out_features = backends.in_out_features(base_layer)

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        r: int,
        alpha: float,
        scaling: float,
        dropout: float,
        init: bool | str,
        variant: LoraVariant,
        dtype: torch.dtype,
    ) -> LoraAdapter:
        device = self.base_layer.weight.device
        adapter = LoraAdapter(
            self.in_features, self.out_features, r, alpha, scaling, dropout, variant, dtype, device
        )
        adapter.reset_parameters(init, self.base_layer)
        self.adapters[name] = adapter
        self.slot = None
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        self.slot = None
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    def set_mixed(self, mapping: AdapterMapping | None) -> None:
        """Start (or end, with None) a mixed-adapter batch on this layer."""
        update = None if mapping is None else mapping.update(self.stacked(mapping), self.base_layer)
        # a plain attribute: skip nn.Module.__setattr__'s parameter/buffer/module checks, which
        # a server would pay on ~200 layers twice whenever its batch changes
        object.__setattr__(self, "mixed", update)

    def stacked(self, mapping: AdapterMapping) -> AdapterStack | None:
        """The adapters a mixed batch needs, stacked (None if the layer has none of them): all
        of the layer's, kept in its slot until they change, if the batch keeps slots; else the
        batch's, made for it."""
        if not mapping.keep_slots:
            present = tuple(n for n in mapping.adapters if n in self.adapters)
            return AdapterStack.build(self.adapters, self.base_layer, present) if present else None
        if self.slot is None and len(self.adapters):
            self.slot = AdapterStack.build(self.adapters, self.base_layer, tuple(self.adapters))
        return self.slot

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """base(x) + the adapters' update."""
        return self.add_update(x, self.base_layer(x, *args, **kwargs))

    def add_update(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the base layer's output for `x`) plus the update of the mixed batch under
        way, or of the active unmerged adapters."""
        if self.disabled:
            return result
        if self.mixed is not None:
            return self.mixed(x, result)
        for name in self.active_adapters:
            if name not in self.merged_adapters:
                result = self.adapters[name](x, result, self.base_layer)
        return result

    # -- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        """Merge adapters into the frozen weight, computed in fp32 whatever the storage dtype."""
        names = self.active_adapters if names is None else names
        names = [n for n in names if n not in self.merged_adapters]
        if not names:
            return
        weight = self.merged_weight(names)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(
                f"merging adapters {names} would write NaN/inf into the base weight; "
                "the layer is left unchanged"
            )
        backends.write_dense_weight(self.base_layer, weight)
        self.slot = None  # DoRA's factor in it depends on the base weight
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def merged_weight(self, names: list[str]) -> torch.Tensor:
        """The dense fp32 (out, in) weight with adapters `names` merged on top of those merged
        already, computed without changing the layer (merges and exports both use it)."""
        weight = backends.dense_weight(self.base_layer)
        # variants whose merge depends on the weight (DoRA) see it without earlier merges, as
        # forward does; variants return new tensors, so `base` is never modified
        base = weight
        for name in reversed(self.merged_adapters):
            base = self.adapters[name].variant.unmerge(self.adapters[name], base)
        for name in names:
            weight = self.adapters[name].variant.merge(self.adapters[name], weight, base)
        return weight

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        names = list(self.merged_adapters) if names is None else names
        names = [n for n in names if n in self.merged_adapters]
        if not names:
            return
        weight = backends.dense_weight(self.base_layer)
        for name in reversed(names):
            weight = self.adapters[name].variant.unmerge(self.adapters[name], weight)
        backends.write_dense_weight(self.base_layer, weight)
        self.slot = None
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
        # set for the duration of a mixed-adapter batch: (copy, its rows) per adapter present
        self.groups: list[tuple[nn.Module, torch.Tensor]] | None = None
        self.group_rows = 0

    def add_copy(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original_module)

    def set_active(self, names: list[str]) -> None:
        present = [n for n in names if n in self.copies]
        self.active_adapter = present[0] if present else None

    def set_mixed(self, mapping: AdapterMapping | None) -> None:
        """Start (or end, with None) a mixed-adapter batch on this module."""
        if mapping is None:
            self.groups = None
            return
        self.groups = [
            (self.copies[n], (mapping.row_ids == i).nonzero().flatten())
            for i, n in enumerate(mapping.adapters)
            if n in self.copies
        ]
        self.group_rows = len(mapping.row_ids)

    @property
    def current(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.copies[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.groups is None or self.disabled:
            return self.current(*args, **kwargs)
        return self._mixed_forward(*args, **kwargs)

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # a full module per adapter cannot be stacked: run each adapter's copy on its rows
        out = self.original_module(x, *args, **kwargs)
        n_rows = self.group_rows
        for module, rows in self.groups:
            if len(rows) == 0:
                continue
            if x.shape[0] != n_rows:  # rows repeated by generate (beams / return sequences)
                k = x.shape[0] // n_rows
                rows = (rows.unsqueeze(1) * k + torch.arange(k, device=rows.device)).flatten()
            rows = rows.to(x.device)
            out[rows] = module(x[rows], *args, **kwargs).to(out.dtype)
        return out

    def __getattr__(self, name: str) -> Any:
        # transformers reads attributes such as `.weight` of the module it expects to find here
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.current, name)


def wrapped_modules(module: nn.Module) -> Iterator[LoraLayer | ParamLoraLayer | ModulesToSave]:
    """The LoRA layers and saved modules under `module`, without walking into them (their
    adapters are most of the module tree)."""
    for child in module.children():
        if isinstance(child, (LoraLayer, ParamLoraLayer, ModulesToSave)):
            yield child
        else:
            yield from wrapped_modules(child)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer | ParamLoraLayer]]:
    """The layers holding adapters: linear layers (`LoraLayer`) and the modules whose
    parameters are adapted (`ParamLoraLayer`); both merge, unmerge, switch and disable alike."""
    for name, module in model.named_modules():
        if isinstance(module, (LoraLayer, ParamLoraLayer)):
            yield name, module


def saved_modules(model: nn.Module) -> Iterator[tuple[str, ModulesToSave]]:
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            yield name, module


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: adapters off, merged adapters temporarily unmerged."""
    layers = [m for _, m in adapter_layers(model)]
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
