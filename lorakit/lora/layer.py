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
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator

import torch
from torch import nn

from lorakit.lora import backends
from lorakit.lora.decode_kernel import decode_kernel, tile_kernel
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


# Without the compiled kernel, on a bf16/fp16 base, a mixed batch whose update is at least this
# much work (tokens × stacked rank) is computed in the base's dtype: prefills, and decoding many
# rows over many adapters, where the stacked adapters' bytes dominate. Smaller products (decoding a
# few rows) stay in the adapters' fp32, where small bf16 GEMMs cost several times more in fixed
# overhead.
LOW_PRECISION_WORK = 1024
# What the compiled kernel reads and writes, on the CPU. It reads the stacked adapters in the
# input's dtype: on a bf16 base, a bf16 copy (made once per stack), because decoding many
# adapters is bound by streaming their weights; the products accumulate in fp32 either way.
# Where the CPU has AMX tiles, bf16 batches whose ranks are multiples of 16 use them instead
# (`AdapterStack.tiles`); there x·Aᵀ is rounded to bf16 before the second product, as in
# vLLM's LoRA kernels.
_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


@dataclass
class AdapterStack:
    """One layer's adapters concatenated along r, for `AdapterGroups` (see there)."""

    names: tuple[str, ...]
    a: torch.Tensor  # [Σr, in]
    b_t: torch.Tensor  # [Σr, out], scaling (and DoRA's output factor) folded in
    offsets: dict[str, tuple[int, int]]  # adapter -> its columns
    g: dict[str, torch.Tensor]  # DoRA adapters' output factor [out]
    lowered: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @cached_property
    def tiles(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The bf16 weights in the AMX kernel's tile layout (decode_kernel.cpp, `lora_tiles_`),
        made once; None where that kernel cannot take them (ranks not multiples of 16, or in /
        out not multiples of 32 / 16)."""
        (stacked, n_in), n_out = self.a.shape, self.b_t.shape[1]
        if any((c1 - c0) % 16 for c0, c1 in self.offsets.values()) or n_in % 32 or n_out % 16:
            return None
        # from a transient bf16 copy: the kernel then never reads the row-major one
        a, b_t = self.lowered.get(torch.bfloat16) or (self.a.bfloat16(), self.b_t.bfloat16())
        a_tiles = a.view(stacked // 16, 16, n_in // 32, 16, 2).permute(0, 2, 3, 1, 4)
        b_tiles = b_t.view(stacked // 16, 8, 2, n_out // 16, 16).permute(0, 3, 1, 4, 2)
        return a_tiles.contiguous(), b_tiles.contiguous()

    @cached_property
    def layout(self) -> tuple:
        """Equal for the stacks of layers whose adapters sit at the same columns: such layers
        share what a batch's rows mean for them (`_RowLayout`)."""
        return (tuple(self.offsets.items()), self.a.dtype, self.a.device)

    def in_dtype(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b_t) in `dtype`, made once."""
        if dtype == self.a.dtype:
            return self.a, self.b_t
        if dtype not in self.lowered:
            self.lowered[dtype] = (self.a.to(dtype), self.b_t.to(dtype))
        return self.lowered[dtype]

    @classmethod
    @torch.no_grad()
    def build(cls, layer: "LoraLayer", names: tuple[str, ...]) -> "AdapterStack":
        offsets, g, a, b_t, offset = {}, {}, [], [], 0
        for name in names:
            ad = layer.adapters[name]
            scale = ad.variant.output_scale(ad, layer.base_layer)
            col = ad.scaling if scale is None else ad.scaling * scale.unsqueeze(1)
            a.append(ad.lora_A.detach())
            b_t.append((ad.lora_B * col).t())
            offsets[name] = (offset, offset + ad.r)
            offset += ad.r
            if scale is not None:
                g[name] = scale
        return cls(names, torch.cat(a), torch.cat(b_t), offsets, g)


@dataclass
class RowGroups:
    """A decoding batch's rows gathered by adapter, for two batched products per layer: group j
    holds the rows of the span's j-th adapter (all of one rank), padded to the largest group.
    Each row meets only its own adapter's weights (a dense masked product would multiply every
    row by every adapter in the span: K times the work with K adapters)."""

    index: torch.Tensor  # [groups · m]: the row of x in each place (padding: row 0)
    inverse: torch.Tensor  # [rows]: each row's place (rows without an adapter: a padding one)
    valid: torch.Tensor | None  # [groups, m, 1], 0 on padding; None if nothing is padded
    in_order: bool  # places are rows 0..n-1 in order: x and the output are used as views
    groups: int
    m: int
    rank: int

    @classmethod
    def build(
        cls, row_ids: torch.Tensor, names: list[str], stack: AdapterStack, lo: int, hi: int
    ) -> "RowGroups | None":
        """None if the span's adapters differ in rank (the masked product handles that)."""
        ranks = {c1 - c0 for c0, c1 in stack.offsets.values() if lo <= c0 and c1 <= hi}
        if len(ranks) != 1:
            return None
        rank = ranks.pop()
        groups: list[list[int]] = [[] for _ in range((hi - lo) // rank)]
        ids = row_ids.tolist()
        for i, slot in enumerate(ids):
            if slot < len(names) and names[slot] in stack.offsets:
                groups[(stack.offsets[names[slot]][0] - lo) // rank].append(i)
        m = max(len(g) for g in groups)
        if sum(map(len, groups)) < len(ids) and all(len(g) == m for g in groups):
            m += 1  # rows without an adapter read their (zero) update from a padding place
        index: list[int] = []
        valid: list[float] = []
        place: dict[int, int] = {}
        pad = None  # the first padding place
        for j, g in enumerate(groups):
            place.update((i, j * m + k) for k, i in enumerate(g))
            if len(g) < m and pad is None:
                pad = j * m + len(g)
            index += g + [0] * (m - len(g))
            valid += [1.0] * len(g) + [0.0] * (m - len(g))
        inverse = [place.get(i, pad) for i in range(len(ids))]
        device = stack.a.device
        return cls(
            index=torch.tensor(index, device=device),
            inverse=torch.tensor(inverse, device=device),
            valid=(
                torch.tensor(valid, dtype=stack.a.dtype, device=device).view(len(groups), m, 1)
                if pad is not None
                else None
            ),
            in_order=index == list(range(len(ids))),
            groups=len(groups),
            m=m,
            rank=rank,
        )


@dataclass
class KernelRows:
    """A decoding batch for the compiled kernel (decode_kernel.cpp): the rows that have an
    adapter in the layer, sorted by adapter (a group's rows then find its weights in cache),
    and each row's columns in the stack. Any mix of ranks."""

    rows: torch.Tensor  # [n] int64
    cols: torch.Tensor  # [n, 2] int64: (first, end) column in AdapterStack.a / .b_t
    _by_seq: dict[int, "KernelRows"] = field(default_factory=dict)

    @classmethod
    def build(cls, row_ids: torch.Tensor, names: list[str], stack: AdapterStack) -> "KernelRows":
        order = sorted(
            (stack.offsets[names[slot]], i)
            for i, slot in enumerate(row_ids.tolist())
            if slot < len(names) and names[slot] in stack.offsets
        )
        return cls(
            rows=torch.tensor([i for _, i in order], dtype=torch.long),
            cols=torch.tensor([c for c, _ in order], dtype=torch.long).view(-1, 2),
        )

    def positions(self, seq: int) -> "KernelRows":
        """The same for a prefill of `seq` positions per row: every position is a kernel row."""
        if seq == 1:
            return self
        cached = self._by_seq.get(seq)
        if cached is None:
            rows = (self.rows[:, None] * seq + torch.arange(seq)).flatten()
            cached = KernelRows(rows, self.cols.repeat_interleave(seq, 0))
            self._by_seq[seq] = cached
        return cached


class _RowLayout:
    """What a mixed batch's row→adapter assignment means for the layers whose adapters sit at
    the same columns of their stacks (shared by those layers, built once per batch composition).
    The parts only the torch paths use are made when first needed: with the compiled kernel a
    batch needs only `kernel_rows`."""

    def __init__(
        self,
        names: list[str],
        row_ids: torch.Tensor,
        stack: AdapterStack,
        segments: list[tuple[int, int, int]] | None,
    ) -> None:
        offsets = stack.offsets
        present = [n for n in names if n in offsets]
        self.empty = not present
        if self.empty:
            return
        # the span of the stack's columns between the batch's first and last adapter
        lo = min(offsets[n][0] for n in present)
        hi = max(offsets[n][1] for n in present)
        if row_ids.device != stack.a.device:
            row_ids = row_ids.to(stack.a.device)
        self.lo, self.hi = lo, hi
        self._names, self.row_ids, self._stack = names, row_ids, stack
        self.kernel_rows = KernelRows.build(row_ids.cpu(), names, stack)
        # each segment's rows and its adapter's columns (relative to the span)
        self.segments = None
        if segments is not None:
            self.segments = [
                (r0, r1, offsets[names[slot]][0] - lo, offsets[names[slot]][1] - lo)
                for slot, r0, r1 in segments
                if slot < len(names) and names[slot] in offsets
            ]
        self._mask: torch.Tensor | None = None
        self._lowered: dict[torch.dtype, torch.Tensor] = {}
        self._uniform: bool | None = None
        self._groups: RowGroups | None | bool = False  # False: not built yet

    @property
    def mask(self) -> torch.Tensor:
        """[rows, span]: 1 on each row's own adapter's columns."""
        if self._mask is None:
            stack, lo, hi = self._stack, self.lo, self.hi
            blocks = torch.zeros(len(self._names) + 1, hi - lo, dtype=stack.a.dtype)
            for i, name in enumerate(self._names):
                if name in stack.offsets:
                    c0, c1 = stack.offsets[name]
                    blocks[i, c0 - lo : c1 - lo] = 1
            self._mask = blocks.to(stack.a.device)[self.row_ids]
        return self._mask

    def mask_in(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._lowered:
            self._lowered[dtype] = self.mask.to(dtype)
        return self._lowered[dtype]

    @property
    def uniform(self) -> bool:
        """Every row uses the one adapter in the span: an all-ones mask, skipped in forward."""
        if self._uniform is None:
            self._uniform = bool((self.mask == 1).all())
        return self._uniform

    @property
    def row_groups(self) -> RowGroups | None:
        if self._groups is False:
            self._groups = RowGroups.build(self.row_ids, self._names, self._stack, self.lo, self.hi)
        return self._groups  # type: ignore[return-value]


def row_segments(row_ids: torch.Tensor) -> list[tuple[int, int, int]] | None:
    """(slot, first row, end row) of each run of equal ids, if every slot's rows are one run
    (rows grouped by adapter), else None."""
    ids = row_ids.tolist()
    runs: list[tuple[int, int, int]] = []
    for i, slot in enumerate(ids):
        if runs and runs[-1][0] == slot:
            runs[-1] = (slot, runs[-1][1], i + 1)
        else:
            runs.append((slot, i, i + 1))
    return runs if len({slot for slot, _, _ in runs}) == len(runs) else None


class AdapterGroups:
    """One layer's adapters for a mixed-adapter batch (built once per batch composition).

    The layer's adapters are concatenated along r (an `AdapterStack`: A_cat [Σr, in], B_cat
    [Σr, out]); the batch uses the span of columns between its first and last adapter there.
    - Inference on the CPU (decoding steps and prefills, fp32 or bf16): one call of the compiled
      kernel (`KernelRows`, decode_kernel.cpp), each row (or prefill token) meeting only its own
      adapter's weights, read in the input's dtype.
    - Without the kernel, decoding with adapters of one rank: rows gathered by adapter into two
      batched products (`RowGroups`); prefills whose rows are grouped by adapter: two GEMMs per
      adapter on its rows, so no row pays for the other adapters' columns.
    - Otherwise (mixed ranks, autograd, DoRA): a row mask keeps each row's own block of
      columns, so the update is two plain GEMMs shared by all rows, whatever the adapter mix.
      "__base__" rows and adapters this layer lacks get an all-zero mask row (no place in
      `RowGroups` or `KernelRows`).
    Without the kernel, large updates on a bf16/fp16 base are computed in that dtype
    (LOW_PRECISION_WORK).

    `stacks`, if given, is a cache the caller owns (and empties when adapters change): it then
    holds one stack of all the layer's adapters, so a server whose batch changes rows every few
    steps only rebuilds what depends on the rows. `masks` (per call) shares that part between the
    layers whose adapters sit at the same columns: a server builds this for ~200 layers every
    few steps, so the per-layer work here is kept to a few lookups.
    """

    def __init__(
        self,
        layer: "LoraLayer",
        names: list[str],
        row_ids: torch.Tensor,
        stacks: dict[Any, AdapterStack] | None = None,
        masks: dict[Any, "_RowLayout"] | None = None,
        segments: list[tuple[int, int, int]] | None = None,
    ) -> None:
        adapters = layer.adapters
        if stacks is None:
            present = tuple(n for n in names if n in adapters)
            stack = AdapterStack.build(layer, present) if present else None
        else:
            key = (id(layer), tuple(adapters.keys()))
            stack = stacks.get(key)
            if stack is None and key[1]:
                stack = stacks[key] = AdapterStack.build(layer, key[1])
        self.empty = stack is None
        if self.empty:
            return
        # layers holding the same adapters at the same ranks share what depends on the rows
        shared = masks.get(stack.layout) if masks is not None else None
        if shared is None:
            shared = _RowLayout(names, row_ids, stack, segments)
            if masks is not None:
                masks[stack.layout] = shared
        self.empty = shared.empty
        if self.empty:
            return
        self.stack, self.rows_layout = stack, shared
        dtype, device = stack.a.dtype, stack.a.device
        self.kernel = self.tile_kernel = None
        if device.type == "cpu" and dtype in _KERNEL_DTYPES:
            self.kernel, self.tile_kernel = decode_kernel(), tile_kernel()
        self.g = None
        if stack.g:
            g = torch.ones(len(names) + 1, layer.out_features, dtype=dtype, device=device)
            for i, name in enumerate(names):
                if name in stack.g:
                    g[i] = stack.g[name]
            self.g = g[shared.row_ids]
        self.n_rows = len(row_ids)
        self._by_dtype: dict[torch.dtype, tuple] = {}

    @property
    def span(self) -> slice:
        return slice(self.rows_layout.lo, self.rows_layout.hi)

    @property
    def a(self) -> torch.Tensor:
        return self.stack.a[self.span]

    @property
    def b_t(self) -> torch.Tensor:
        return self.stack.b_t[self.span]

    def _rows(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mask and output factor for a batch of `n` rows."""
        mask = self.rows_layout.mask
        if n == self.n_rows:
            return mask, self.g
        if n % self.n_rows:
            raise ValueError(f"a mixed-adapter batch of {self.n_rows} rows met a batch of {n}")
        k = n // self.n_rows  # generate repeats each row for beams / return sequences
        g = None if self.g is None else self.g.repeat_interleave(k, 0)
        return mask.repeat_interleave(k, 0), g

    def _weights(self, dtype: torch.dtype):
        """(A_span^T, B_span^T, per-segment (rows, A^T, B^T) or None) in `dtype`, made once."""
        w = self._by_dtype.get(dtype)
        if w is None:
            a, b_t = (t[self.span] for t in self.stack.in_dtype(dtype))
            segs, segments = None, self.rows_layout.segments
            if segments is not None and len(segments) > 1:
                segs = [(slice(r0, r1), a[c0:c1].t(), b_t[c0:c1]) for r0, r1, c0, c1 in segments]
            w = self._by_dtype[dtype] = (a.t(), b_t, segs)
        return w

    def __call__(
        self, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module
    ) -> torch.Tensor:
        if self.empty:
            return result
        n = x.shape[0]
        if (
            n != self.n_rows
            or self.g is not None
            or torch.is_grad_enabled()
            or not result.is_contiguous()
        ):
            return self._general(x, result, base_layer, *self._rows(n))
        # inference: the update is added into the base layer's fresh output with as few calls as
        # possible (a decoding step makes ~200 of them, each with tiny products)
        x2 = x.reshape(-1, x.shape[-1])
        out = result.view(-1, result.shape[-1])
        if self.kernel is not None and x.dtype in _KERNEL_DTYPES:
            kr = self.rows_layout.kernel_rows.positions(x2.shape[0] // n)
            tiles = self.stack.tiles if self.tile_kernel and x.dtype == torch.bfloat16 else None
            if tiles is not None:
                self.tile_kernel(out, x2.contiguous(), *tiles, kr.rows, kr.cols)
            else:
                self.kernel(out, x2.contiguous(), *self.stack.in_dtype(x.dtype), kr.rows, kr.cols)
            return result
        tokens = x2.shape[0]
        if tokens == n and self.rows_layout.row_groups is not None:  # decoding, torch path
            self._decode(x2, out, self.rows_layout.row_groups)
            return result
        width = self.a.shape[0]
        low = x.dtype != self.a.dtype and tokens * width >= LOW_PRECISION_WORK
        a_t, b_t, segs = self._weights(x.dtype if low else self.a.dtype)
        if x2.dtype != a_t.dtype:
            x2 = x2.to(a_t.dtype)
        if segs is not None and tokens > n:  # a prefill grouped by adapter
            x3, out3 = x2.view(n, -1, x2.shape[-1]), out.view(n, -1, out.shape[-1])
            for rows, a_i, b_i in segs:
                h = torch.mm(x3[rows].flatten(0, 1), a_i)
                _add_product(out3[rows].flatten(0, 1), h, b_i)
            return result
        h = torch.mm(x2, a_t)  # [tokens, span]
        if not self.rows_layout.uniform:
            h.view(n, -1, width).mul_(self.rows_layout.mask_in(h.dtype).unsqueeze(1))
        _add_product(out, h, b_t)
        return result

    def _decode(self, x: torch.Tensor, out: torch.Tensor, rows: RowGroups) -> None:
        """out += each row's own adapter update, as two batched products over the adapters'
        groups of rows, in the adapters' dtype: on a CPU, small fp32 batched products cost a
        fraction of bf16 ones, and the stacked weights are used in place (views): A as
        [groups, in, r], B as [groups, r, out]."""
        a3 = self.a.view(rows.groups, rows.rank, -1).transpose(1, 2)
        b3 = self.b_t.view(rows.groups, rows.rank, -1)
        xg = x if rows.in_order else x.index_select(0, rows.index)
        h = torch.bmm(xg.to(a3.dtype).view(rows.groups, rows.m, -1), a3)
        if rows.valid is not None:
            h.mul_(rows.valid)
        delta = torch.bmm(h, b3).view(rows.groups * rows.m, -1).to(out.dtype)
        out.add_(delta if rows.in_order else delta.index_select(0, rows.inverse))

    def _general(self, x, result, base_layer, mask, g) -> torch.Tensor:
        """Out of place in the adapters' dtype: autograd, and DoRA's output factor."""
        n = x.shape[0]
        xs = x.reshape(n, -1, x.shape[-1]).to(self.a.dtype)
        h = torch.nn.functional.linear(xs, self.a) * mask.unsqueeze(1)
        delta = torch.matmul(h, self.b_t)
        res = result.reshape(n, -1, result.shape[-1])
        if g is not None:
            bias = getattr(base_layer, "bias", None)
            base_out = res if bias is None else res - bias
            delta = delta + (g - 1).unsqueeze(1) * base_out
        return (res + delta.to(res.dtype)).view(result.shape)


def _add_product(out: torch.Tensor, h: torch.Tensor, b_t: torch.Tensor) -> None:
    """out += h @ b_t, fused when the dtypes agree."""
    if h.dtype == out.dtype:
        out.addmm_(h, b_t)
    else:  # a bf16 += fp32 add_ takes a slow mixed-dtype path: 4x a cast then an add at 140 rows
        out.add_(torch.mm(h, b_t).to(out.dtype))


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
        self.groups: AdapterGroups | None = None  # set for the duration of a mixed-adapter batch
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
        return adapter

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge([name])
        del self.adapters[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: list[str]) -> None:
        self.active_adapters = [n for n in names if n in self.adapters]

    def set_groups(self, groups: AdapterGroups | None) -> None:
        """Start (or end, with None) a mixed-adapter batch on this layer."""
        # a plain attribute: skip nn.Module.__setattr__'s parameter/buffer/module checks, which
        # a server would pay on ~200 layers twice whenever its batch changes
        object.__setattr__(self, "groups", groups)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.groups is not None:
            return self.groups(x, result, self.base_layer)
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

    def set_groups(self, names: list[str], row_ids: torch.Tensor) -> None:
        self.groups = [
            (self.copies[n], (row_ids == i).nonzero().flatten())
            for i, n in enumerate(names)
            if n in self.copies
        ]
        self.group_rows = len(row_ids)

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


def wrapped_modules(module: nn.Module) -> Iterator[LoraLayer | ModulesToSave]:
    """The LoRA layers and saved modules under `module`, without walking into them (their
    adapters are most of the module tree)."""
    for child in module.children():
        if isinstance(child, (LoraLayer, ModulesToSave)):
            yield child
        else:
            yield from wrapped_modules(child)


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
