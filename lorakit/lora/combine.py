"""Weighted combinations of adapters into a new adapter (PEFT's `add_weighted_adapter`).

With ΔWᵢ = sᵢ·Bᵢ Aᵢ and weights wᵢ, the new adapter (scaling 1: alpha = r) holds:
- "cat":    A = [w₁s₁A₁; w₂s₂A₂; ...], B = [B₁, B₂, ...]: exactly Σ wᵢ ΔWᵢ, rank Σ rᵢ.
- "svd":    the best rank-k approximation of Σ wᵢ ΔWᵢ (Eckart–Young), k = svd_rank or max rᵢ;
            B = U_k·diag(S_k), A = V_kᵀ as PEFT splits it.
- "linear": PEFT's definition, not a sum of deltas: A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ and
            B = Σ √|wᵢsᵢ|·Bᵢ, so ΔW = B A includes cross terms Bᵢ Aⱼ. Needs equal ranks.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace
from typing import Sequence

import torch

from lorakit.lora.files import AdapterModel
from lorakit.lora.layer import LoraAdapter, lora_layers
from lorakit.lora.params import ParamAdapter, param_layers

COMBINATIONS = ("linear", "cat", "svd")


def _max_rank(config) -> int:
    return max([config.r, *config.rank_pattern.values()])


def add_weighted_adapter(
    model: AdapterModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
) -> None:
    """A new (inactive) adapter combining `adapters` with `weights`: "cat" (exact Σ wᵢΔWᵢ),
    "svd" (its best rank-`svd_rank` approximation) or "linear" (PEFT's A/B mix; equal ranks).
    Also `LoraModel.add_weighted_adapter`, with the model as `self`."""
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_sources(model, adapters, weights, adapter_name, combination_type)
    configs = [model.peft_config[a] for a in adapters]
    if len(adapters) == 1:
        combination_type = "linear"  # as PEFT: every method reduces to scaling one adapter
    new_rank = _new_rank(adapters, [_max_rank(c) for c in configs], combination_type, svd_rank)
    layers = [
        (name, layer)
        for name, layer in lora_layers(model.model)
        if any(a in layer.adapters for a in adapters)
    ]
    params = [
        (f"{name}.{param}", layer, param)
        for name, layer in param_layers(model.model)
        for param in layer.shapes
        if any(a in layer.adapters and param in layer.adapters[a] for a in adapters)
    ]
    config = _combined_config(configs[0], new_rank, layers, [p[0] for p in params])
    model.add_adapter(adapter_name, config)
    with torch.no_grad():
        for _, layer in layers:
            parts = [
                (layer.adapters[a], w) for a, w in zip(adapters, weights) if a in layer.adapters
            ]
            a_new, b_new = _combine(parts, combination_type, new_rank)
            _write(layer.adapters[adapter_name], a_new, b_new)
        for _, layer, param in params:
            parts = [
                (layer.adapters[a][param], w)
                for a, w in zip(adapters, weights)
                if a in layer.adapters and param in layer.adapters[a]
            ]
            _combine_experts(parts, layer.adapters[adapter_name][param], combination_type)


def _write(target: LoraAdapter, a_new: torch.Tensor, b_new: torch.Tensor) -> None:
    """A combination of rank ≤ target's into the target adapter (zero-padded)."""
    target.lora_A.zero_()
    target.lora_B.zero_()
    target.lora_A[: a_new.shape[0]] = a_new.to(target.lora_A.dtype)
    target.lora_B[:, : b_new.shape[1]] = b_new.to(target.lora_B.dtype)


def _combine_experts(parts: list, target: ParamAdapter, kind: str) -> None:
    """The combination of parameter adapters, expert by expert, into `target` (PEFT's layout:
    expert e's rows of A are a block, its columns of B are strided)."""
    a_t, b_t = target.factors()  # views of target's tensors, [E, R, in] and [E, out, R]
    a_t.zero_()
    b_t.zero_()
    for e in range(target.shape.experts):
        views = [
            (SimpleNamespace(lora_A=a[e], lora_B=b[e], scaling=ad.scaling, r=ad.r), w)
            for ad, w in parts
            for a, b in [ad.factors()]
        ]
        a_new, b_new = _combine(views, kind, target.r)
        a_t[e, : a_new.shape[0]] = a_new.to(a_t.dtype)
        b_t[e, :, : b_new.shape[1]] = b_new.to(b_t.dtype)


def _check_sources(
    model: AdapterModel, adapters: list[str], weights: list[float], new: str, kind: str
) -> None:
    """ValueError unless the adapters, weights, new name and combination can be combined."""
    if not adapters or len(adapters) != len(weights):
        raise ValueError(
            f"give one weight per adapter (got {len(adapters)} adapters and {len(weights)} weights)"
        )
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    unknown = [a for a in adapters if a not in model.peft_config]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; have {model.list_adapters()}")
    if new in model.peft_config:
        raise ValueError(f"adapter '{new}' already exists")
    if kind not in COMBINATIONS:
        raise ValueError(f"combination_type={kind!r}: use one of {COMBINATIONS}")
    for name in adapters:
        config = model.peft_config[name]
        if config.use_dora:
            raise ValueError(
                f"adapter '{name}' is a DoRA adapter; its change to the weight is not "
                "a low-rank product, so it cannot be combined linearly"
            )
        if config.modules_to_save:
            raise ValueError(
                f"adapter '{name}' trains full modules ({config.modules_to_save}), "
                "which a weighted LoRA combination cannot express"
            )


def _new_rank(adapters: list[str], ranks: list[int], kind: str, svd_rank: int | None) -> int:
    if kind == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(
                f"combination_type='linear' needs adapters of equal rank, got "
                f"{dict(zip(adapters, ranks))}; use 'cat' or 'svd'"
            )
        return ranks[0]
    if kind == "cat":
        return sum(ranks)
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank < 1):
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    return svd_rank or max(ranks)


def _combined_config(first, rank: int, layers: list, parameters: list[str]):
    """The new adapter's config: scaling 1 (alpha = r without rsLoRA), every layer and parameter
    that holds any of the adapters named explicitly, and a zero-B start whatever the sources
    used (a PiSSA init would rewrite the base)."""
    config = copy.deepcopy(first)
    config.r = config.lora_alpha = rank
    config.use_rslora = False
    config.rank_pattern, config.alpha_pattern = {}, {}
    config.target_modules = sorted(name for name, _ in layers)
    config.target_parameters = sorted(parameters) or None
    config.exclude_modules = None
    config.layers_to_transform = config.layers_pattern = None
    config.init_lora_weights = True
    return config


def _combine(
    parts: list[tuple[LoraAdapter, float]], kind: str, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the combination on one layer, computed in float64; rank ≤ `rank`."""
    if kind == "cat":
        a = torch.cat([ad.lora_A.double() * (w * ad.scaling) for ad, w in parts], dim=0)
        b = torch.cat([ad.lora_B.double() for ad, _ in parts], dim=1)
        return a, b
    if kind == "linear":
        if len({ad.r for ad, _ in parts}) > 1:
            raise ValueError(
                "combination_type='linear' needs equal ranks in every layer (a "
                "rank_pattern differs); use 'cat' or 'svd'"
            )
        a = sum(
            math.copysign(math.sqrt(abs(w * ad.scaling)), w * ad.scaling) * ad.lora_A.double()
            for ad, w in parts
        )
        b = sum(math.sqrt(abs(w * ad.scaling)) * ad.lora_B.double() for ad, w in parts)
        return a, b
    delta = sum(w * ad.scaling * (ad.lora_B.double() @ ad.lora_A.double()) for ad, w in parts)
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    k = min(rank, s.shape[0])
    return vh[:k], u[:, :k] * s[:k]
