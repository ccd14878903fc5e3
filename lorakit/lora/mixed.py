"""Mixed-adapter batches: every row of a batch with its own adapter (or none), in one forward.

As vLLM's `PunicaWrapper`: a batch's row→adapter mapping (`AdapterMapping`) is computed once per
batch composition and shared by every layer; each `LoraLayer` keeps its adapters concatenated
along r in a slot of its own (an `AdapterStack`); per layer and batch, `MixedUpdate` picks once
how the update is computed and adds it to the base layer's output:
- Inference on the CPU (decoding steps and prefills, fp32 or bf16): one call of the compiled
  kernel (`KernelRows`, decode_kernel.cpp), each row (or prefill token) meeting only its own
  adapter's weights, read in the input's dtype; AMX tiles where the CPU has them.
- Without the kernel, decoding with adapters of one rank: rows gathered by adapter into two
  batched products (`RowGroups`); prefills whose rows are grouped by adapter: two GEMMs per
  adapter on its rows, so no row pays for the other adapters' columns.
- Otherwise (mixed ranks, autograd, DoRA): a row mask keeps each row's own block of columns,
  so the update is two plain GEMMs shared by all rows, whatever the adapter mix.
Rows without an adapter (`BASE_ADAPTER`) and adapters a layer lacks get an all-zero mask row
(no place in `RowGroups` or `KernelRows`). Without the kernel, large updates on a bf16/fp16 base
are computed in that dtype (LOW_PRECISION_WORK).

A server builds a mapping for ~200 layers every few steps, so the per-layer work is kept to a
few lookups: layers whose adapters sit at the same columns share one `RowLayout`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from lorakit.lora.decode_kernel import decode_kernel, tile_kernel

BASE_ADAPTER = "__base__"  # reserved: the row uses no adapter (PEFT's spelling)

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
    """One layer's adapters concatenated along r: the layer's slot for mixed batches."""

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
        share what a batch's rows mean for them (`RowLayout`)."""
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
    def build(
        cls, adapters: Mapping[str, nn.Module], base_layer: nn.Module, names: tuple[str, ...]
    ) -> "AdapterStack":
        """`names` (LoraAdapters in `adapters`) stacked in this order."""
        offsets, g, a, b_t, offset = {}, {}, [], [], 0
        for name in names:
            ad = adapters[name]
            scale = ad.variant.output_scale(ad, base_layer)
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


class RowLayout:
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


class AdapterMapping:
    """One mixed batch: which adapter each row uses, computed once per batch composition and
    shared by every layer (`LoraLayer.set_mixed`).

    `adapters` are the batch's adapters in slot order; row i uses slot `row_ids[i]`, where
    `len(adapters)` means none (`BASE_ADAPTER`); `segments` are the runs of rows of one slot
    when the rows are grouped by adapter. With `keep_slots`, each layer stacks all its adapters
    once and keeps them (`LoraLayer.stacked`) until its adapters change: for a caller that does
    not change adapter weights in place between batches (a server); otherwise each batch
    stacks the adapters it uses afresh.
    """

    def __init__(self, names: Sequence[str], keep_slots: bool = False) -> None:
        self.adapters = [n for n in dict.fromkeys(names) if n != BASE_ADAPTER]
        slot = {n: i for i, n in enumerate(self.adapters)}
        self.row_ids = torch.tensor([slot.get(n, len(self.adapters)) for n in names])
        self.segments = row_segments(self.row_ids)
        self.keep_slots = keep_slots
        self._layouts: dict[tuple, RowLayout] = {}  # by AdapterStack.layout
        self._kernels: tuple[Callable | None, Callable | None] | None = None

    def token_slots(self, tokens: int) -> torch.Tensor:
        """The slot of each of `tokens` tokens, for layers that see the batch flattened
        [rows · positions] (MoE experts and routers). generate repeats each row in place (beams,
        return sequences), so each row's tokens stay one run, whatever the repetition."""
        per_row = tokens // len(self.row_ids)
        if per_row * len(self.row_ids) != tokens:
            raise RuntimeError(
                f"a mixed batch of {len(self.row_ids)} rows met {tokens} flattened tokens: "
                "its adapters cannot be assigned to them"
            )
        return self.row_ids.repeat_interleave(per_row)

    def update(self, stack: AdapterStack | None, base_layer: nn.Module) -> "LayerUpdate":
        """The update of the layer whose adapters are `stack` (None: it has none)."""
        if stack is None:
            return NO_UPDATE
        layout = self._layouts.get(stack.layout)
        if layout is None:  # the first layer with these adapters at these columns
            layout = RowLayout(self.adapters, self.row_ids, stack, self.segments)
            self._layouts[stack.layout] = layout
        if layout.empty:
            return NO_UPDATE
        return MixedUpdate(self, stack, layout, base_layer)

    def kernels(self) -> tuple[Callable | None, Callable | None]:
        """The compiled kernels (row-major, AMX tiles; None where not available), looked up
        once per batch and only if a layer can use them (the first use builds them)."""
        if self._kernels is None:
            self._kernels = decode_kernel(), tile_kernel()
        return self._kernels


class LayerUpdate:
    """What a layer adds to its base output in a mixed batch: here nothing (no adapter of the
    batch is on the layer)."""

    def __call__(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return result


NO_UPDATE = LayerUpdate()


class MixedUpdate(LayerUpdate):
    """One layer's update in a mixed batch, its path picked once (see the module's docstring):
    the compiled kernel where the stack is on the CPU in fp32 / bf16, the general out-of-place
    product for DoRA, torch's products otherwise. Only what a call's input decides is left to
    the call: autograd, rows repeated by `generate`, the input's dtype, decoding or prefill."""

    def __init__(
        self, mapping: AdapterMapping, stack: AdapterStack, layout: RowLayout, base_layer: nn.Module
    ) -> None:
        self.stack, self.rows_layout, self.base_layer = stack, layout, base_layer
        dtype, device = stack.a.dtype, stack.a.device
        self.kernel = self.tile_kernel = None
        if device.type == "cpu" and dtype in _KERNEL_DTYPES:
            self.kernel, self.tile_kernel = mapping.kernels()
        names, row_ids = mapping.adapters, mapping.row_ids
        self.g = None  # DoRA adapters' output factor, per row: the general path
        if stack.g:
            g = torch.ones(len(names) + 1, stack.b_t.shape[1], dtype=dtype, device=device)
            for i, name in enumerate(names):
                if name in stack.g:
                    g[i] = stack.g[name]
            self.g = g[layout.row_ids]
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

    def __call__(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the base layer's output for `x`) plus each row's own adapter update."""
        n = x.shape[0]
        if (
            n != self.n_rows
            or self.g is not None
            or torch.is_grad_enabled()
            or not result.is_contiguous()
        ):
            return self._general(x, result, *self._rows(n))
        # inference: the update is added into the base layer's fresh output with as few calls as
        # possible (a decoding step makes ~200 of them, each with tiny products)
        x2 = x.reshape(-1, x.shape[-1])
        out = result.view(-1, result.shape[-1])
        if self.kernel is not None and x.dtype in _KERNEL_DTYPES:
            self._by_kernel(x2, out, n)
        elif x2.shape[0] == n and self.rows_layout.row_groups is not None:  # decoding, torch
            self._decode(x2, out, self.rows_layout.row_groups)
        else:
            self._by_torch(x2, out, n)
        return result

    def _by_kernel(self, x2: torch.Tensor, out: torch.Tensor, n: int) -> None:
        """out += the update, by one call of the compiled kernel (AMX tiles where they fit)."""
        kr = self.rows_layout.kernel_rows.positions(x2.shape[0] // n)
        tiles = self.stack.tiles if self.tile_kernel and x2.dtype == torch.bfloat16 else None
        if tiles is not None:
            self.tile_kernel(out, x2.contiguous(), *tiles, kr.rows, kr.cols)
        else:
            self.kernel(out, x2.contiguous(), *self.stack.in_dtype(x2.dtype), kr.rows, kr.cols)

    def _by_torch(self, x2: torch.Tensor, out: torch.Tensor, n: int) -> None:
        """out += the update by torch's GEMMs: per adapter on its rows for a prefill grouped by
        adapter, else over the span with the row mask."""
        tokens = x2.shape[0]
        width = self.a.shape[0]
        low = x2.dtype != self.a.dtype and tokens * width >= LOW_PRECISION_WORK
        a_t, b_t, segs = self._weights(x2.dtype if low else self.a.dtype)
        if x2.dtype != a_t.dtype:
            x2 = x2.to(a_t.dtype)
        if segs is not None and tokens > n:  # a prefill grouped by adapter
            x3, out3 = x2.view(n, -1, x2.shape[-1]), out.view(n, -1, out.shape[-1])
            for rows, a_i, b_i in segs:
                h = torch.mm(x3[rows].flatten(0, 1), a_i)
                _add_product(out3[rows].flatten(0, 1), h, b_i)
            return
        h = torch.mm(x2, a_t)  # [tokens, span]
        if not self.rows_layout.uniform:
            h.view(n, -1, width).mul_(self.rows_layout.mask_in(h.dtype).unsqueeze(1))
        _add_product(out, h, b_t)

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

    def _general(self, x, result, mask, g) -> torch.Tensor:
        """Out of place in the adapters' dtype: autograd, and DoRA's output factor."""
        n = x.shape[0]
        xs = x.reshape(n, -1, x.shape[-1]).to(self.a.dtype)
        h = torch.nn.functional.linear(xs, self.a) * mask.unsqueeze(1)
        delta = torch.matmul(h, self.b_t)
        res = result.reshape(n, -1, result.shape[-1])
        if g is not None:
            bias = getattr(self.base_layer, "bias", None)
            base_out = res if bias is None else res - bias
            delta = delta + (g - 1).unsqueeze(1) * base_out
        return (res + delta.to(res.dtype)).view(result.shape)


def _add_product(out: torch.Tensor, h: torch.Tensor, b_t: torch.Tensor) -> None:
    """out += h @ b_t, fused when the dtypes agree."""
    if h.dtype == out.dtype:
        out.addmm_(h, b_t)
    else:  # a bf16 += fp32 add_ takes a slow mixed-dtype path: 4x a cast then an add at 140 rows
        out.add_(torch.mm(h, b_t).to(out.dtype))
