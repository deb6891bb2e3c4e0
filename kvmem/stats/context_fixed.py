"""Context windows without host synchronisation (the GPU path of kvmem.stats.context): a slot-aligned form.

ContextWindows keeps its entries as sorted unique keys [E] and windows [E, W]; E changes with every
update, and finding it (torch.unique, nonzero) reads a size back to the host. The sync-free form instead
keeps one entry per shown slot, in the order of ``ContextWindows.referenced``'s slots:

  key     [d, S] int64    neuron * 2**32 + token index of the slot's example (_PAD: empty slot)
  window  [d, S, W]       dtype, as in ContextWindows (NaN = not known)

S = min(n_top, k) + min(n_docs, k) + min(n_bottom, k) + k (the sample) + 4 (quadrants, gated layers). A
token shown by two slots of a neuron has two equal entries. An update (after the LayerStats' own) reads
the slots' keys, takes each one's window from the kept entry with the same key (a compare of the S new
against the S kept keys per neuron; from the sorted form by searchsorted when that is what is kept), NaN
for new keys, and fills the positions whose tokens are in the batch exactly as the torch path of
kvmem.stats.context does: the same values, so ``materialize`` (torch.unique: it synchronises, and runs
only when the state is read: state_dict, merge, lookup, at batch boundaries) gives the sorted form bit for
bit. Memory: S · (8 + 2·W) bytes per neuron in bfloat16 (44 slots, W = 15: about 1.7 KB), plus a
transient [d, S, S] bool per update.
"""

from __future__ import annotations

import torch

_LOW = 2**32 - 1
_PAD = 2**63 - 1


def _bits(t: torch.Tensor) -> torch.dtype:
    """The integer dtype of t's element size (copies through it keep every bit, NaN payloads included)."""
    return {2: torch.int16, 4: torch.int32}[t.element_size()]


def slot_keys(cw, stats) -> torch.Tensor:
    """Keys [d, S] of the shown slots of ``stats`` (a LayerStats), _PAD for empty ones."""
    parts = [stats.top.index[:, :cw.n_top], stats.top_docs.index[:, :cw.n_docs],
             stats.bottom.index[:, :cw.n_bottom], stats.sample.index]
    if stats.gated:
        parts.append(stats.quadrants.index)
    idx = torch.cat([p.to(cw.device) for p in parts], dim=1)
    neuron = torch.arange(cw.d_mlp, device=cw.device)[:, None]
    return torch.where(idx >= 0, neuron * 2**32 + idx, torch.full_like(idx, _PAD))


def kept(cw, key: torch.Tensor) -> torch.Tensor:
    """Windows [d, S, W] of the keys [d, S]: the kept entry's where the key was kept, else NaN."""
    d, s = key.shape
    nan = torch.full((d, s, cw.width), float("nan"), dtype=cw.dtype, device=cw.device)
    if cw._fixed is not None:
        okey, owin = cw._fixed
        if okey.shape[1] == 0:
            return nan
        match = (key[:, :, None] == okey[:, None, :]) & (key[:, :, None] != _PAD)  # [d, S, S_old]
        j = match.to(torch.int8).argmax(2)
        bits = _bits(owin)  # gather on the bits: on CPU a bfloat16 gather rewrites NaN payloads
        win = torch.gather(owin.view(bits), 1, j[:, :, None].expand(d, s, cw.width)).view(cw.dtype)
        return torch.where(match.any(2)[:, :, None], win, nan)
    if cw._key.shape[0] == 0:
        return nan
    flat = key.reshape(-1)
    p = torch.searchsorted(cw._key, flat).clamp(max=cw._key.shape[0] - 1)
    found = (cw._key.index_select(0, p) == flat)[:, None]
    return torch.where(found, cw._window.index_select(0, p), nan.view(-1, cw.width)).view(d, s, cw.width)


def update(cw, stats, m: torch.Tensor, index: torch.Tensor, pos: torch.Tensor) -> None:
    """ContextWindows.update without host synchronisation: m [N, d] float32, index [N] int64 increasing,
    pos [N] int64 (on cw.device). Leaves the slot-aligned form in cw._fixed."""
    n, d = m.shape
    key = slot_keys(cw, stats)
    win = kept(cw, key)
    flat = key.reshape(-1)
    tok, neuron = flat & _LOW, flat >> 32
    r = torch.searchsorted(index, tok).clamp(max=n - 1)  # [d*S]
    here = (index[r] == tok) & (flat != _PAD)  # the slot's token is in this batch
    rr = r[:, None] + cw._offs  # [d*S, W] batch row of each window position
    rc = rr.clamp(0, n - 1)
    ok = (here[:, None] & (rr >= 0) & (rr < n) & (index[rc] == tok[:, None] + cw._offs)
          & (pos[rc] == pos[r][:, None] + cw._offs))  # the same model row
    got = m.reshape(-1)[(rc * d + neuron.clamp(0, d - 1)[:, None]).reshape(-1)].view_as(rr).to(cw.dtype)
    win = torch.where(ok, got, win.view(-1, cw.width)).view(d, -1, cw.width)
    cw._fixed = (key, win)


def materialize(cw) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted form (key [E], window [E, W]) of cw._fixed (synchronises: torch.unique)."""
    key, win = cw._fixed
    flat = key.reshape(-1)
    uk, inv = torch.unique(flat, return_inverse=True)  # sorted; equal keys carry equal windows
    out = torch.empty((uk.numel(), cw.width), dtype=cw.dtype, device=cw.device)
    out.view(_bits(out))[inv] = win.reshape(-1, cw.width).view(_bits(out))  # on the bits, NaNs as they are
    keep = uk != _PAD
    return uk[keep], out[keep]
