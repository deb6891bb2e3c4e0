"""ContextWindows: for every example the report can show, the neuron's m over the example's context window.

Kept while the window's tokens stream through the profiler, so the report shades contexts without a
second forward pass. Entries are keyed by (neuron, global token index), not by store slot, so shifting
slots and shard merges need no bookkeeping. After every update of the LayerStats it belongs to, the
entries are exactly the (neuron, index) pairs referenced by

  the first n_top slots of ``top``, n_docs of ``top_docs``, n_bottom of ``bottom``   (an entry's rank in
      these stores only ever worsens as the stream goes on, so no later slot can come back into view)
  every slot of ``sample`` (the report picks quantile bands from its final content)
  every quadrant example (gated layers)

State (axes: E entries, W = before + 1 + after window positions, c <= before carried tokens):

  key      [E] int64       neuron * 2**32 + token index, ascending (so by neuron, then index)
  window   [E, W] dtype    m of that neuron at tokens index - before .. index + after; NaN = not known
  carry    [c, d_mlp]      m of the last c tokens seen (carry_index [c] int64, contiguous, ending where the
                           next batch starts), so windows of tokens at the start of a batch reach back
                           into the previous batch; windows that run past a batch are completed by the next

Window values are the profiler's m exactly, rounded to ``dtype``: bfloat16 by default. GPU runs compute
m in bfloat16, so it loses nothing there; on CPU it is within 2**-8 relative (0.4%), far below the 1/20 of
max|m| the report's 21 shading levels resolve (a level moves by one for ~0.1% of positions); and unlike
float16 it keeps float32's range, so massive activations cannot overflow. float32 is exact. Positions are not clipped to the example's document (rows run across
documents): readers clip with the token store (kvmem.report.data.windows). Positions before the stream
(or shard) start or after its end stay NaN; so do positions in another shard after ``merge``.

Cost per update: a sort of the referenced keys (torch.unique), a searchsorted against the kept ones and a
fill of the windows that reach into the batch, about 3 ms per SmolLM2 layer (1536 neurons, ~57k entries)
on 2 CPU cores once the stores settle; on a GPU, unique and nonzero each synchronise with the host once
per layer (LayerStats.update already does for its input checks). Memory: 8 + 2·W bytes per entry.

state_dict() names: meta.{version,d_mlp,before,after,n_top,n_docs,n_bottom}, count [d_mlp] int64 (entries
per neuron: the entries are sorted by neuron, so this is all the file needs of it), index [E] int64 (so
LayerStats.shifted moves it with the other token indices), window [E, W], carry.value [c, d_mlp],
carry.index [c] int64.
"""

from __future__ import annotations

import torch

from kvmem.errors import KvmemError

_STATE_VERSION = 1
_LOW = 2**32 - 1
_PAD = 2**63 - 1  # sorts after every real key
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ContextWindows:
    """Context windows of the shown examples of one layer (see the module docstring)."""

    def __init__(self, d_mlp: int, before: int = 10, after: int = 4, n_top: int = 10, n_docs: int = 5,
                 n_bottom: int = 5, dtype: torch.dtype = torch.bfloat16, device="cpu"):
        if d_mlp < 1 or min(before, after, n_top, n_docs, n_bottom) < 0:
            raise KvmemError(f"ContextWindows needs d_mlp >= 1 and non-negative before, after, n_top, n_docs, "
                             f"n_bottom (got {d_mlp}, {before}, {after}, {n_top}, {n_docs}, {n_bottom})")
        if dtype not in DTYPES.values():
            raise KvmemError(f"ContextWindows dtype must be one of {', '.join(DTYPES)} (got {dtype})")
        self.d_mlp, self.before, self.after = int(d_mlp), int(before), int(after)
        self.n_top, self.n_docs, self.n_bottom = int(n_top), int(n_docs), int(n_bottom)
        self.dtype, self.device = dtype, torch.device(device)
        self.width = self.before + 1 + self.after
        self._offs = torch.arange(-self.before, self.after + 1, device=self.device)  # [W]
        self.key = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.window = torch.full((0, self.width), float("nan"), dtype=dtype, device=self.device)
        self.carry = torch.zeros(0, self.d_mlp, dtype=dtype, device=self.device)
        self.carry_index = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._carry_end = -1  # token index after the carry's last (-1: no carry)

    @property
    def settings(self) -> tuple[int, ...]:
        """(d_mlp, before, after, n_top, n_docs, n_bottom)."""
        return self.d_mlp, self.before, self.after, self.n_top, self.n_docs, self.n_bottom

    # ------------------------------------------------------------------ which entries
    def referenced(self, stats) -> torch.Tensor:
        """Sorted unique keys [E] of the (neuron, index) pairs the shown slots of ``stats`` (a LayerStats)
        reference now."""
        parts = [stats.top.index[:, :self.n_top], stats.top_docs.index[:, :self.n_docs],
                 stats.bottom.index[:, :self.n_bottom], stats.sample.index]
        if stats.gated:
            parts.append(stats.quadrants.index)
        idx = torch.cat([p.to(self.device) for p in parts], dim=1)  # [d_mlp, slots]
        neuron = torch.arange(self.d_mlp, device=self.device)[:, None]
        key = torch.where(idx >= 0, neuron * 2**32 + idx, torch.full_like(idx, _PAD)).flatten()
        key = torch.unique(key)  # sorted
        return key[:-1] if key.numel() and bool(key[-1] == _PAD) else key

    def _keep(self, key: torch.Tensor) -> torch.Tensor:
        """Windows [len(key), W] of ``key`` (sorted): the known ones, NaN rows for new keys."""
        if self.key.numel() == 0:
            return torch.full((key.numel(), self.width), float("nan"), dtype=self.dtype, device=self.device)
        pos = torch.searchsorted(self.key, key).clamp(max=self.key.numel() - 1)
        new = (self.key.index_select(0, pos) != key).nonzero().squeeze(1)
        return self.window.index_select(0, pos).index_fill_(0, new, float("nan"))

    # ------------------------------------------------------------------ update
    def update(self, stats, m: torch.Tensor, start: int) -> None:
        """After ``stats.update`` of a batch: m [N, d_mlp] (float32, contiguous) of the tokens
        [start, start + N) of the stream. Keeps the windows of the entries ``stats`` now references,
        drops the rest, and fills the window positions that fall in the carry or in this batch."""
        n, d = m.shape
        if d != self.d_mlp:
            raise ValueError(f"m must be [N, {self.d_mlp}], got {tuple(m.shape)}")
        key = self.referenced(stats)
        window = self._keep(key)
        c = int(self.carry_index.numel()) if self._carry_end == start else 0  # the tokens just before?
        lo = start - c  # known tokens: [lo, start + n)
        index, neuron = key & _LOW, key >> 32
        sel = (index + self.after >= lo).nonzero().squeeze(1)  # windows reaching into the known tokens
        if sel.numel() and n:
            t = index[sel, None] + self._offs  # [S, W] token of each position
            nb = neuron[sel, None]
            w = window.index_select(0, sel)
            r = t - start
            in_m = (r >= 0) & (r < n)
            got = m.reshape(-1).index_select(0, (r.clamp(0, n - 1) * d + nb).flatten()).view_as(t)
            w = torch.where(in_m, got.to(self.dtype), w)
            if c:
                rc = t - lo
                in_c = (rc >= 0) & (rc < c)
                got = self.carry[-c:].reshape(-1).index_select(0, (rc.clamp(0, c - 1) * d + nb).flatten())
                w = torch.where(in_c, got.view_as(t), w)
            window.index_copy_(0, sel, w)
        self.key, self.window = key, window
        self._set_carry(m, start, c)

    def _set_carry(self, m: torch.Tensor, start: int, c: int) -> None:
        """The last ``before`` known tokens: the carry's last c (contiguous with the batch), then m."""
        n, b = m.shape[0], self.before
        if n >= b:
            value, first = m[n - b:].to(self.dtype), start + n - b
        else:
            keep = min(c, b - n)
            value = torch.cat([self.carry[self.carry.shape[0] - keep:], m.to(self.dtype)])
            first = start - keep
        self.carry = value.contiguous()
        self.carry_index = torch.arange(first, first + value.shape[0], device=self.device)
        self._carry_end = first + value.shape[0]

    # ------------------------------------------------------------------ merge
    def merge(self, other: "ContextWindows", stats=None) -> "ContextWindows":
        """Add the windows of ``other`` (another block of the stream) in place; returns self. A position
        known in either is known (where both know it, self's value); with ``stats`` (the merged
        LayerStats) only the entries it references are kept. The carry is the one that ends later."""
        if other.settings != self.settings or other.dtype != self.dtype:
            raise KvmemError(f"cannot merge context windows with (d_mlp, before, after, n_top, n_docs, n_bottom) "
                             f"{other.settings} / {other.dtype} into {self.settings} / {self.dtype}")
        key = torch.cat([self.key, other.key.to(self.device)])
        win = torch.cat([self.window, other.window.to(self.device)])
        order = torch.sort(key, stable=True).indices  # self's entry first among equal keys
        key, win = key[order], win[order]
        if key.numel() > 1:
            dup = torch.cat([torch.zeros(1, dtype=torch.bool, device=self.device), key[1:] == key[:-1]])
            later = dup.nonzero().squeeze(1)  # the second of each pair (keys are unique within a side)
            win[later - 1] = torch.where(torch.isnan(win[later - 1]), win[later], win[later - 1])
            key, win = key[~dup], win[~dup]
        self.key, self.window = key, win
        if stats is not None:
            ref = self.referenced(stats)
            self.window, self.key = self._keep(ref), ref
        if other.carry_index.numel() and other._carry_end > self._carry_end:
            self.carry, self.carry_index = other.carry.to(self.device).clone(), other.carry_index.to(self.device).clone()
            self._carry_end = other._carry_end
        return self

    # ------------------------------------------------------------------ read-outs
    def lookup(self, neuron: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Windows [..., W] float32 of (neuron, index) pairs (same shape [...]); NaN rows for pairs not
        kept (or index < 0)."""
        neuron, index = neuron.to(self.device).long(), index.to(self.device).long()
        key = torch.where(index >= 0, neuron * 2**32 + index, torch.full_like(index, _PAD)).flatten()
        nan = torch.full((key.numel(), self.width), float("nan"), device=self.device)
        if self.key.numel() == 0:
            return nan.view(*index.shape, self.width)
        pos = torch.searchsorted(self.key, key).clamp(max=self.key.numel() - 1)
        found = (self.key[pos] == key)[:, None]
        return torch.where(found, self.window[pos].float(), nan).view(*index.shape, self.width)

    def covers(self, before: int, after: int, n_top: int, n_docs: int, n_bottom: int) -> bool:
        """Whether windows of this size were kept for at least this many slots of each store."""
        return (before <= self.before and after <= self.after and n_top <= self.n_top and n_docs <= self.n_docs
                and n_bottom <= self.n_bottom)

    @property
    def neuron(self) -> torch.Tensor:
        """Neuron of each entry [E] int64."""
        return self.key >> 32

    @property
    def index(self) -> torch.Tensor:
        """Global token index of each entry [E] int64."""
        return self.key & _LOW

    def nbytes(self) -> int:
        """Bytes held (entries, windows and carry)."""
        return sum(t.numel() * t.element_size() for t in (self.key, self.window, self.carry, self.carry_index))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        def i64(x: int) -> torch.Tensor:
            return torch.tensor(int(x), dtype=torch.int64, device=self.device)

        sd = {"meta.version": i64(_STATE_VERSION), "meta.d_mlp": i64(self.d_mlp), "meta.before": i64(self.before),
              "meta.after": i64(self.after), "meta.n_top": i64(self.n_top), "meta.n_docs": i64(self.n_docs),
              "meta.n_bottom": i64(self.n_bottom),
              "count": torch.bincount(self.neuron, minlength=self.d_mlp), "index": self.index,
              "window": self.window, "carry.value": self.carry, "carry.index": self.carry_index}
        return {name: t.detach().clone().contiguous() for name, t in sd.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        if int(sd["meta.version"]) != _STATE_VERSION:
            raise KvmemError(f"ContextWindows state version {int(sd['meta.version'])} is not {_STATE_VERSION}")
        meta = tuple(int(sd[f"meta.{x}"]) for x in ("d_mlp", "before", "after", "n_top", "n_docs", "n_bottom"))
        if meta != self.settings or sd["window"].dtype != self.dtype:
            raise KvmemError(f"ContextWindows state {meta} / {sd['window'].dtype} does not fit {self.settings} / "
                             f"{self.dtype}")
        dev = self.device
        neuron = torch.repeat_interleave(torch.arange(self.d_mlp, device=dev), sd["count"].to(dev).long())
        self.key = neuron * 2**32 + sd["index"].to(dev).long()
        self.window = sd["window"].to(dev).clone()
        self.carry, self.carry_index = sd["carry.value"].to(dev).clone(), sd["carry.index"].to(dev).long().clone()
        self._carry_end = int(self.carry_index[-1]) + 1 if self.carry_index.numel() else -1

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], device="cpu") -> "ContextWindows":
        c = cls(*(int(sd[f"meta.{x}"]) for x in ("d_mlp", "before", "after", "n_top", "n_docs", "n_bottom")),
                dtype=sd["window"].dtype, device=device)
        c.load_state_dict(sd)
        return c

    def __repr__(self) -> str:
        return (f"ContextWindows(d_mlp={self.d_mlp}, before={self.before}, after={self.after}, n_top={self.n_top}, "
                f"n_docs={self.n_docs}, n_bottom={self.n_bottom}, entries={self.key.numel()})")
