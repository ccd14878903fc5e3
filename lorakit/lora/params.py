"""LoRA on parameters that are not linear layers: Mixture-of-Experts weights and routers.

transformers 5 keeps the experts of a MoE block as fused 3-D parameters of one module
(`mlp.experts.gate_up_proj` [experts, 2·inter, hidden], `down_proj` [experts, hidden, inter]) and
the router as a custom module with a 2-D `weight`. PEFT adapts them with `target_parameters`;
lorakit keeps PEFT's layout, so adapter files go both ways:
- one adapter on one parameter holds lora_A [experts·r, in] and lora_B [out, experts·r]; expert e
  uses rows e·r … e·r+r-1 of A and columns e, e+E, e+2E, … of B (a 2-D parameter is one expert);
  ΔW_e = scaling · B_e A_e, with PEFT's scaling (alpha / r, rsLoRA alpha / √r);
- `ParamLoraLayer` wraps the module holding the parameters (one wrapper per module, whatever the
  number of adapted parameters; `lora.files` writes PEFT's nested key names).

Forward: an experts module that transformers describes (`use_experts_implementation`: gate,
bias and transposition flags) is computed here the way transformers' grouped implementation
computes it, with each expert's low-rank update added for the tokens routed to that expert only
(`routed_forward`). Any other module runs its own forward with W + ΔW substituted (routers,
where W is small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.func import functional_call

from lorakit import compat
from lorakit.errors import ConfigError
from lorakit.lora.mixed import AdapterMapping

ROUTED_PARAMETERS = ("gate_up_proj", "up_proj", "down_proj")
# PEFT's own reasons, for the options its parameter wrapper refuses
_PEFT_REFUSES = "lora.ParamWrapper does not work with"


@dataclass(frozen=True)
class ParamShape:
    """How a targeted parameter maps to LoRA's (out, in): experts × out × in, or transposed."""

    experts: int
    in_features: int
    out_features: int
    transposed: bool  # stored [experts, in, out] (e.g. gpt-oss)
    ndim: int

    @classmethod
    def of(cls, module: nn.Module, name: str, full_name: str) -> "ParamShape":
        p = getattr(module, name)
        if p.ndim == 2:
            return cls(1, p.shape[1], p.shape[0], False, 2)
        if p.ndim == 3:
            transposed = getattr(module, "is_transposed", None)
            if transposed is None:
                raise ConfigError(
                    f"target_parameters: '{full_name}' is a 3-D parameter of "
                    f"{type(module).__name__}, whose layout lorakit does not know (transformers "
                    "marks the fused experts it describes with is_transposed; this module does "
                    "not). Name the parameters to adapt more fully (e.g. "
                    "'mlp.experts.down_proj') to leave it out"
                )
            e, d1, d2 = p.shape
            return cls(e, d1, d2, True, 3) if transposed else cls(e, d2, d1, False, 3)
        raise ConfigError(
            f"target_parameters: '{full_name}' has {p.ndim} dimensions; lorakit (like PEFT) "
            "adapts 2-D and 3-D parameters only"
        )

    def to_param(self, delta: torch.Tensor) -> torch.Tensor:
        """A delta [experts, out, in] in the parameter's own layout."""
        if self.ndim == 2:
            return delta[0]
        return delta.transpose(1, 2) if self.transposed else delta


class ParamAdapter(nn.Module):
    """One adapter on one parameter, in PEFT's layout (see the module docstring)."""

    def __init__(
        self,
        shape: ParamShape,
        r: int,
        alpha: float,
        scaling: float,
        dtype: torch.dtype,
        device: torch.device | str | None,
    ) -> None:
        super().__init__()
        self.shape, self.r, self.alpha, self.scaling = shape, r, alpha, scaling
        e = shape.experts
        self.lora_A = nn.Parameter(
            torch.empty(e * r, shape.in_features, dtype=dtype, device=device)
        )
        self.lora_B = nn.Parameter(
            torch.empty(shape.out_features, e * r, dtype=dtype, device=device)
        )

    @torch.no_grad()
    def reset_parameters(self, init: bool | str) -> None:
        """PEFT's initialisation, with PEFT's random draws in PEFT's order (A and B are built as
        nn.Linear layers, then A is drawn again): the same seed gives PEFT's adapter."""
        a, b = torch.empty(self.lora_A.shape), torch.empty(self.lora_B.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / self.r)
        elif init is not False:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.lora_A.copy_(a)
        self.lora_B.copy_(b if init is False else torch.zeros_like(b))

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [experts, r, in], B [experts, out, r]): each expert's own pair."""
        e = self.shape.experts
        a = self.lora_A.view(e, self.r, -1)
        b = self.lora_B.view(self.lora_B.shape[0], self.r, e).permute(2, 0, 1)
        return a, b

    def delta(self) -> torch.Tensor:
        """scaling · B_e A_e for every expert, [experts, out, in], in the adapter's dtype."""
        a, b = self.factors()
        return torch.bmm(b, a) * self.scaling

    def peft_tensors(self) -> dict[str, nn.Parameter]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"experts={self.shape.experts}, r={self.r}, alpha={self.alpha}"


def check_config(config: Any) -> None:
    """Refuse, with PEFT's reasons, what PEFT's parameter wrapper refuses."""
    if config.lora_dropout:
        raise ConfigError(
            f"{_PEFT_REFUSES} lora_dropout != 0 (target_parameters: x cannot be factored out "
            "of a dropout inside the expert computation); set lora_dropout=0"
        )
    if config.fan_in_fan_out:
        raise ConfigError(f"{_PEFT_REFUSES} fan_in_fan_out (target_parameters)")
    if config.use_dora:
        raise ConfigError(
            f"{_PEFT_REFUSES} use_dora=True (target_parameters: LoRA variants like DoRA are "
            "for linear layers); adapt the experts with plain LoRA"
        )
    if config.init_lora_weights not in (True, False, "gaussian"):
        raise ConfigError(
            f"init_lora_weights={config.init_lora_weights!r} needs a linear layer's weight; "
            "target_parameters take True, False or 'gaussian'"
        )


class ParamLoraLayer(nn.Module):
    """A module whose parameters carry adapters; y = its forward with W + Σ ΔW (routed experts:
    each token's update from its own experts only)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        # adapter name -> parameter name -> ParamAdapter
        self.adapters = nn.ModuleDict()
        self.shapes: dict[str, ParamShape] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.mixed: AdapterMapping | None = None
        self.slot = None  # mixed batches read the adapters directly: nothing is stacked

    # -- adapters -----------------------------------------------------------------------------
    def add_adapter(
        self,
        name: str,
        param: str,
        full_name: str,
        r: int,
        alpha: float,
        scaling: float,
        init: bool | str,
        dtype: torch.dtype,
    ) -> ParamAdapter:
        shape = self.shapes.get(param) or ParamShape.of(self.base_layer, param, full_name)
        self.shapes[param] = shape
        device = getattr(self.base_layer, param).device
        adapter = ParamAdapter(shape, r, alpha, scaling, dtype, device)
        adapter.reset_parameters(init)
        if name not in self.adapters:
            self.adapters[name] = nn.ModuleDict()
        self.adapters[name][param] = adapter
        return adapter

    def parameters_of(self, name: str) -> list[str]:
        """The parameters adapter `name` adapts, in the module's own parameter order (the order
        PEFT nests its wrappers in: the first one innermost)."""
        own = self.adapters[name] if name in self.adapters else {}
        return [p for p, _ in self.base_layer.named_parameters(recurse=False) if p in own]

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    def set_mixed(self, mapping: AdapterMapping | None) -> None:
        object.__setattr__(self, "mixed", mapping)

    def running(self) -> list[str]:
        """The active adapters not merged into the weights: those the forward adds."""
        return [n for n in self.active_adapters if n not in self.merged_adapters]

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.disabled or (self.mixed is None and not self.running()):
            return self.base_layer(*args, **kwargs)
        if is_routed_experts(self.base_layer) and set(self.shapes) <= set(ROUTED_PARAMETERS):
            # (hidden, top_k_index, top_k_weights), however the MoE block names them
            return routed_forward(self, *args, *kwargs.values())
        if self.mixed is not None:
            return self._mixed_substituted(*args, **kwargs)
        return self._substituted(self.running(), args, kwargs)

    def _substituted(self, names: list[str], args: tuple, kwargs: dict) -> Any:
        """The module's own forward with W + Σ ΔW of adapters `names` in place of W."""
        weights = {}
        for param, shape in self.shapes.items():
            deltas = [self.adapters[n][param].delta() for n in names if param in self.adapters[n]]
            if deltas:
                w = getattr(self.base_layer, param)
                weights[param] = w + shape.to_param(sum(deltas)).to(w.dtype)
        return functional_call(self.base_layer, weights, args, kwargs)

    def _mixed_substituted(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """A mixed batch on a module with its own forward (a router): each adapter of the batch
        on all tokens, each token keeping its own adapter's outputs."""
        slots = self.mixed.token_slots(x.shape[0]).to(x.device)
        out = self.base_layer(x, *args, **kwargs)
        for i, name in enumerate(self.mixed.adapters):
            if name in self.adapters and bool((slots == i).any()):
                mine = self._substituted([name], (x, *args), kwargs)
                out = _select_rows(slots == i, mine, out)
        return out

    def token_updates(
        self, param: str, x: torch.Tensor, counts: list[int], slots: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The adapters' update of expert parameter `param` for `x` (rows sorted by expert,
        `counts` per expert; in a mixed batch `slots` is each row's adapter slot), or None if
        no adapter applies."""
        names = self.mixed.adapters if self.mixed is not None else self.running()
        total = None
        for i, name in enumerate(names):
            if name not in self.adapters or param not in self.adapters[name]:
                continue
            update = expert_update(self.adapters[name][param], x, counts)
            if slots is not None:
                update = update * (slots == i).unsqueeze(1).to(update.dtype)
            total = update if total is None else total + update
        return total

    # -- merge --------------------------------------------------------------------------------
    @torch.no_grad()
    def merge(self, names: list[str] | None = None, safe_merge: bool = False) -> None:
        names = self.active_adapters if names is None else names
        names = [n for n in names if n in self.adapters and n not in self.merged_adapters]
        if not names:
            return
        new = self.merged_parameters(names)
        if safe_merge and not all(torch.isfinite(w).all() for w in new.values()):
            raise ValueError(
                f"merging adapters {names} would write NaN/inf into the base weights; "
                "the layer is left unchanged"
            )
        for p, w in new.items():
            getattr(self.base_layer, p).copy_(w)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def merged_parameters(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The adapted parameters in fp32 with adapters `names` added to them (merges and
        exports both use it), without changing the layer."""
        return {p: self._with(p, names, +1) for p in self.shapes}

    @torch.no_grad()
    def unmerge(self, names: list[str] | None = None) -> None:
        names = list(self.merged_adapters) if names is None else names
        names = [n for n in names if n in self.merged_adapters]
        if not names:
            return
        for p in self.shapes:
            getattr(self.base_layer, p).copy_(self._with(p, names, -1))
        self.merged_adapters = [n for n in self.merged_adapters if n not in names]

    def _with(self, param: str, names: list[str], sign: int) -> torch.Tensor:
        """Parameter `param` with adapters `names` added (sign +1) or taken out (-1), in fp32."""
        total = getattr(self.base_layer, param).float()
        for n in names:
            if param in self.adapters[n]:
                delta = self.adapters[n][param].delta().float()
                total = total + sign * self.shapes[param].to_param(delta)
        return total

    def extra_repr(self) -> str:
        return f"parameters={sorted(self.shapes)}, active={self.active_adapters}"


def _select_rows(rows: torch.Tensor, mine: Any, out: Any) -> Any:
    """`out` with the rows `rows` (a bool mask over the first dimension) taken from `mine`,
    through the tuples a router returns."""
    if isinstance(out, torch.Tensor):
        if out.dim() == 0 or out.shape[0] != rows.shape[0]:
            return out
        mask = rows.view(-1, *([1] * (out.dim() - 1)))
        return torch.where(mask, mine, out)
    if isinstance(out, tuple):
        return tuple(_select_rows(rows, m, o) for m, o in zip(mine, out))
    return out


def is_routed_experts(module: nn.Module) -> bool:
    """An experts module transformers describes (`use_experts_implementation`): its forward
    takes (hidden, top_k_index, top_k_weights) and its layout flags say how to compute it."""
    flags = ("is_transposed", "has_gate", "has_bias", "_apply_gate", "down_proj", "num_experts")
    if not all(hasattr(module, a) for a in flags):
        return False
    return module.has_gate or hasattr(module, "act_fn")  # the activation of ungated experts


def expert_update(adapter: ParamAdapter, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """scaling · B_e A_e x for each row x of expert e (rows sorted by expert): two small
    products per expert that has rows, none for the others."""
    a, b = adapter.factors()
    # unbind, not a[e]: the backward of one index per expert would build a zero tensor the size
    # of all the experts' factors for each expert. In the adapters' dtype, autocast or not: these
    # products are small (an expert's tokens × r), where CPUs' bf16 GEMMs are slow (bf16 autocast
    # made the whole step 3.3× slower on an AVX512-BF16 CPU, bench/RESULTS.md).
    with torch.autocast(x.device.type, enabled=False):
        rows = x.to(a.dtype).split(counts)
        parts = [
            (xs @ a_e.t()) @ b_e.t()
            for xs, a_e, b_e, n in zip(rows, a.unbind(0), b.unbind(0), counts)
            if n
        ]
        out = torch.cat(parts) if parts else x.new_zeros(0, b.shape[1], dtype=a.dtype)
        return out * adapter.scaling


def routed_forward(
    layer: ParamLoraLayer,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts of `layer.base_layer` on their routed tokens, as transformers' grouped
    implementation computes them, plus each expert's adapter update on its own tokens."""
    ex = layer.base_layer
    tokens, top_k = top_k_index.shape
    expert_ids, order = torch.sort(top_k_index.reshape(-1))
    rows = order // top_k  # the token of each (token, expert) pair, sorted by expert
    x = hidden[rows]
    counts_t = torch.bincount(expert_ids, minlength=ex.num_experts)[: ex.num_experts]
    counts = counts_t.tolist()
    offsets = torch.cumsum(counts_t, 0, dtype=torch.int32)
    slots = None
    if layer.mixed is not None:
        slots = layer.mixed.token_slots(tokens).to(hidden.device)[rows]

    up = "gate_up_proj" if ex.has_gate else "up_proj"
    h = _project(layer, up, x, expert_ids, offsets, counts, slots)
    h = ex._apply_gate(h) if ex.has_gate else ex.act_fn(h)
    out = _project(layer, "down_proj", h, expert_ids, offsets, counts, slots)
    if getattr(ex, "has_post_expert_norm", False):
        out = ex.post_expert_norm(out)
    out = out * top_k_weights.reshape(-1)[order].unsqueeze(-1)
    unsorted = torch.empty_like(out).index_copy_(0, order, out)
    return unsorted.view(tokens, top_k, -1).sum(dim=1).to(hidden.dtype)


def _project(
    layer: ParamLoraLayer,
    param: str,
    x: torch.Tensor,
    expert_ids: torch.Tensor,
    offsets: torch.Tensor,
    counts: list[int],
    slots: torch.Tensor | None,
) -> torch.Tensor:
    ex = layer.base_layer
    bias = getattr(ex, f"{param}_bias")[expert_ids] if ex.has_bias else None
    out = compat.grouped_linear(x, getattr(ex, param), offsets, bias, ex.is_transposed)
    update = layer.token_updates(param, x, counts, slots)
    return out if update is None else out + update.to(out.dtype)


def param_layers(model: nn.Module) -> Iterator[tuple[str, ParamLoraLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, ParamLoraLayer):
            yield name, module
