"""Read-outs of a LayerStats that combine components (bound as its methods): neuron_n, mean, std,
firing_rate, count_above, count_below, to_frame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from kvmem.neurons import NeuronId



def neuron_n(self) -> torch.Tensor:
    """The tokens each neuron's statistics count, int64 [d]: every token of the layer (n) for a dense layer;
    for an MoE layer the tokens routed to the neuron's expert (shared experts: every token)."""
    if self.moe:
        return self.parts["routing"].neuron_n()
    return torch.full((self.d_mlp,), self.n, dtype=torch.int64, device=self.device)


def mean(self) -> torch.Tensor:
    """Mean of m per neuron over the tokens it counts (neuron_n), float64 [d] (NaN where none)."""
    return self.parts["moments"].mean(self.neuron_n() if self.moe else self.n)


def std(self) -> torch.Tensor:
    """Population standard deviation of m per neuron over the tokens it counts, float64 [d]."""
    return self.parts["moments"].std(self.neuron_n() if self.moe else self.n)


def firing_rate(self) -> torch.Tensor:
    """Fraction of tokens with m > 0 per neuron, float64 [d] (NaN before any token); MoE layers: of the
    tokens routed to the neuron's expert (NaN where none)."""
    if self.moe:
        n = self.neuron_n()
        return torch.where(n > 0, self.count_pos.double() / n.clamp(min=1), float("nan"))
    return self.count_pos.double() / self.n if self.n else torch.full_like(self.sum, float("nan"))


def count_above(self, threshold, return_bound: bool = False):
    """Estimated number of tokens with m > threshold per neuron, float64 [d], from the histogram.

    threshold: [d] tensor (or a float for all neurons). E.g. ``s.count_above(0.1 * s.max)`` for
    "fires above 10% of its max". With return_bound=True returns (estimate, bound): the true count is
    within estimate +- bound (bound = count of the bin holding the threshold)."""
    t = torch.as_tensor(threshold, dtype=torch.float32, device=self.device)
    if t.dim() == 0:
        t = t.expand(self.d_mlp)
    est, bound = self.component("hist").above(t)
    return (est, bound) if return_bound else est


def count_below(self, threshold, return_bound: bool = False):
    """Estimated number of tokens with m < -threshold per neuron (the mirror of ``count_above``), float64
    [d]; with return_bound=True (estimate, bound), the true count within estimate +- bound."""
    t = torch.as_tensor(threshold, dtype=torch.float32, device=self.device)
    if t.dim() == 0:
        t = t.expand(self.d_mlp)
    est, bound = self.component("hist").below(t)
    return (est, bound) if return_bound else est


def to_frame(self, layer: int | None = None) -> pd.DataFrame:
    """One row per neuron: neuron (and layer, neuron_id "layer.neuron" if layer is given), n (the tokens the
    neuron's statistics count: the layer's, or for an MoE layer those routed to the neuron's expert), count_pos,
    firing_rate, mean, std, min, max, top_value/top_index, bottom_value/bottom_index, top_doc/top_doc_value,
    n_docs (filled top_docs slots), n_sample, for MoE layers expert, shared, expert_neuron (the neuron's index
    in its expert; neuron_id then "layer.eE.N" / "layer.sS.N") and expert_share (n / the layer's tokens),
    and for gated layers the quadrant counts q_pp, q_pn, q_np,
    q_nn (gate sign, up sign; p = > 0, n = <= 0)."""
    d = self.d_mlp
    top, bot, docs, smp = self.top, self.bottom, self.top_docs, self.sample

    def np_(x: torch.Tensor):
        return x.detach().cpu().numpy()

    cols: dict = {}
    if layer is not None:
        cols["layer"] = [int(layer)] * d
        cols["neuron_id"] = [f"{layer}.{i}" for i in range(d)]
    cols.update(
        neuron=range(d),
        n=np_(self.neuron_n()) if self.moe else [self.n] * d,
        count_pos=np_(self.count_pos),
        firing_rate=np_(self.firing_rate()),
        mean=np_(self.mean()),
        std=np_(self.std()),
        min=np_(self.min),
        max=np_(self.max),
        top_value=np_(top.value[:, 0]),
        top_index=np_(top.index[:, 0]),
        bottom_value=np_(bot.value[:, 0]),
        bottom_index=np_(bot.index[:, 0]),
        top_doc=np_(docs.doc[:, 0]),
        top_doc_value=np_(docs.value[:, 0]),
        n_docs=np_((docs.index >= 0).sum(1)),
        n_sample=np_((smp.index >= 0).sum(1)),
    )
    if self.moe:
        cols.update(expert_columns(self.spec.expert_of.cpu()))
        if layer is not None:
            cols["neuron_id"] = [str(NeuronId(int(layer), int(i), int(e), bool(sh))) for i, e, sh in
                                 zip(cols["expert_neuron"], cols["expert"], cols["shared"])]
        cols["expert_share"] = np_(self.neuron_n()) / self.n if self.n else np.full(d, np.nan)
    if self.gated:
        q = np_(self.quadrant_count)
        for j, name in enumerate(("q_pp", "q_pn", "q_np", "q_nn")):
            cols[name] = q[:, j]
    return pd.DataFrame(cols)


def expert_columns(expert_of: torch.Tensor) -> dict:
    """expert [d] int64 (the routed or shared expert's index), shared [d] bool and expert_neuron [d] int64 (the
    neuron's index within its expert) of the flat neurons of an MoE layer, from its map expert_of [d] (routed
    e: e; shared s: -1 - s; each expert's neurons contiguous, as kvmem.models' MoELayout lays them out)."""
    e = expert_of.to(torch.int64)
    d = e.numel()
    start = torch.ones(d, dtype=torch.bool)
    start[1:] = e[1:] != e[:-1]
    first = torch.cummax(torch.where(start, torch.arange(d), torch.zeros(d, dtype=torch.int64)), 0).values
    shared = e < 0
    return {"expert": torch.where(shared, -1 - e, e).numpy(), "shared": shared.numpy(),
            "expert_neuron": (torch.arange(d) - first).numpy()}
