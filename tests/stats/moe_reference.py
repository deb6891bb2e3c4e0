"""A synthetic mixture-of-experts layer stream (router logits, the experts chosen, their weights, raw m zero
off each expert's tokens) and brute-force statistics over it, for kvmem.stats.routing and the MoE neuron
statistics of kvmem.stats.layer. Axes: N tokens, E routed experts, k chosen per token, d flat neurons."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kvmem.stats import HIST_EDGES, sample_priority
from kvmem.stats.routing import Router

E, K, D_EXPERT, N_SHARED, D_SHARED = 5, 2, 3, 1, 2
D = E * D_EXPERT + N_SHARED * D_SHARED
EXPERT_OF = torch.tensor([e for e in range(E) for _ in range(D_EXPERT)] +
                         [-1 - s for s in range(N_SHARED) for _ in range(D_SHARED)])
NEVER, FEW, NEGATIVE = 3, 2, 1  # expert never chosen (logit -inf), rarely chosen, m < 0 on all its tokens


@dataclass
class MoEStream:
    m: torch.Tensor  # [N, d] raw m, 0 where the token is not routed to the neuron's expert
    ti: torch.Tensor
    doc: torch.Tensor
    pos: torch.Tensor
    logits: torch.Tensor  # [N, E]
    idx: torch.Tensor  # [N, K]
    weight: torch.Tensor  # [N, K]
    bounds: list[int]

    @property
    def active(self) -> torch.Tensor:
        """[N, d] bool: token routed to the neuron's expert (shared: always)."""
        hot = torch.zeros(self.m.shape[0], E + 1, dtype=torch.bool)
        hot.scatter_(1, self.idx, True)
        hot[:, E] = True
        return hot[:, torch.where(EXPERT_OF >= 0, EXPERT_OF, E)]

    def router(self, a: int = 0, b: int | None = None) -> Router:
        return Router(self.logits[a:b], self.idx[a:b], self.weight[a:b])

    def feed(self, s, lo: int = 0, hi: int | None = None):
        """The batches between token lo and hi into LayerStats s; returns s."""
        hi = self.m.shape[0] if hi is None else hi
        cuts = sorted({lo, hi} | {c for c in self.bounds if lo < c < hi})
        for a, b in zip(cuts[:-1], cuts[1:]):
            s.update(self.m[a:b], self.ti[a:b], self.doc[a:b], self.pos[a:b], router=self.router(a, b))
        return s


def make_moe_stream(seed: int = 0, n: int = 400, max_pos: int = 32) -> MoEStream:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, E, generator=g)
    logits[:, FEW] -= 3.0
    logits[:, NEVER] = float("-inf")
    logits[5, 0] = logits[5, 1] = logits[5, 4] = 0.25  # an exact tie in the top-k
    probs = torch.softmax(logits, -1)
    w, idx = torch.topk(probs, K, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    hot = torch.zeros(n, E, dtype=torch.bool).scatter_(1, idx, True)
    x = torch.randn(n, D, generator=g)
    m = torch.nn.functional.silu(x * 2) * torch.randn(n, D, generator=g)
    m[:, NEGATIVE * D_EXPERT:(NEGATIVE + 1) * D_EXPERT] = -x[:, NEGATIVE * D_EXPERT:(NEGATIVE + 1) * D_EXPERT].abs() - 0.1
    m[:, 0] = torch.round(m[:, 0] * 2) / 2  # ties, exact zeros on routed tokens
    active = torch.cat([hot[:, EXPERT_OF[:E * D_EXPERT]], torch.ones(n, N_SHARED * D_SHARED, dtype=torch.bool)], 1)
    m = torch.where(active, m, torch.zeros_like(m))
    ti = torch.cumsum(torch.randint(1, 3, (n,), generator=g), 0)
    lens = torch.randint(1, 30, (n,), generator=g)
    doc = torch.repeat_interleave(torch.arange(n) * 2 + 1, lens)[:n]
    pos = torch.arange(n) % max_pos
    bounds = sorted({0, n, 1, 7, n // 3, n // 2 + 5, n - 2})
    return MoEStream(m, ti, doc, pos, logits, idx, w, bounds)


def _np(x):
    return x.detach().cpu().numpy()


def routing_ref(st: MoEStream) -> dict:
    """Plain loops: load, weight sums, co-selection, the two entropies' sums."""
    n = st.m.shape[0]
    load = np.zeros(E, np.int64)
    wsum = np.zeros(E)
    wsq = np.zeros(E)
    cosel = np.zeros((E, E), np.int64)
    h, hs = [], []
    for t in range(n):
        chosen = [int(e) for e in st.idx[t]]
        for j, e in enumerate(chosen):
            load[e] += 1
            wsum[e] += float(st.weight[t, j])
            wsq[e] += float(st.weight[t, j]) ** 2
            for f in chosen:
                cosel[e, f] += 1
        z = [float(v) for v in st.logits[t]]
        mx = max(z)
        ex = [math.exp(v - mx) if v != float("-inf") else 0.0 for v in z]
        p = [v / sum(ex) for v in ex]
        h.append(-sum(q * math.log(q) for q in p if q > 0))
        ws = [float(v) for v in st.weight[t]]
        q = [v / sum(ws) for v in ws]
        hs.append(-sum(v * math.log(v) for v in q if v > 0))
    return {"n": n, "load": load, "wsum": wsum, "wsq": wsq, "cosel": cosel, "h": np.array(h), "hs": np.array(hs)}


def neuron_ref(st: MoEStream, k: int) -> dict:
    """Per neuron over the tokens routed to its expert only: n, count_pos, sum, sumsq, top / bottom (value,
    index) [d, k], top docs (value, index, doc), the sample (value, index) and the histogram [d, 197]."""
    m, ti, doc, act = _np(st.m), _np(st.ti), _np(st.doc), _np(st.active)
    d = m.shape[1]
    out = {key: np.full((d, k), np.nan, np.float32) for key in ("top_v", "bot_v", "doc_v", "smp_v")}
    out.update({key: np.full((d, k), -1, np.int64) for key in ("top_i", "bot_i", "doc_i", "doc_d", "smp_i")})
    out.update(n=np.zeros(d, np.int64), pos=np.zeros(d, np.int64), sum=np.zeros(d), sumsq=np.zeros(d),
               hist=np.zeros((d, len(HIST_EDGES) - 1), np.int64))
    e = HIST_EDGES.numpy()
    for j in range(d):
        rows = np.nonzero(act[:, j])[0]
        v, idx, dd = m[rows, j], ti[rows], doc[rows]
        out["n"][j], out["pos"][j] = len(rows), int((v > 0).sum())
        out["sum"][j], out["sumsq"][j] = float(np.sum(v.astype(np.float64))), float(np.sum(v.astype(np.float64) ** 2))
        for key, sign in (("top", 1), ("bot", -1)):
            o = np.lexsort((idx, -sign * v))[:k]
            out[key + "_v"][j, :len(o)], out[key + "_i"][j, :len(o)] = v[o], idx[o]
        best: dict = {}
        for val, i, dk in zip(v, idx, dd):
            if dk not in best or val > best[dk][0]:
                best[dk] = (val, i)
        for r, (dk, (bv, bi)) in enumerate(sorted(best.items(), key=lambda it: (-it[1][0], it[1][1]))[:k]):
            out["doc_v"][j, r], out["doc_i"][j, r], out["doc_d"][j, r] = bv, bi, dk
        act_rows = v > 0
        prio = sample_priority(torch.as_tensor(idx[act_rows]), torch.tensor(j)).numpy()
        o = np.argsort(-prio, kind="stable")[:k]
        out["smp_v"][j, :len(o)], out["smp_i"][j, :len(o)] = v[act_rows][o], idx[act_rows][o]
        b = np.where(v > 0, np.searchsorted(e, v, side="right"), np.searchsorted(e, v, side="left")) - 1
        out["hist"][j] = np.bincount(b, minlength=len(e) - 1)
    return out
