"""Read-outs of a LayerStats that combine components (bound as its methods): firing_rate, count_above,
count_below, to_frame."""

from __future__ import annotations

import pandas as pd
import torch



def firing_rate(self) -> torch.Tensor:
    """Fraction of tokens with m > 0 per neuron, float64 [d] (NaN before any token)."""
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
    """One row per neuron: neuron (and layer, neuron_id "layer.neuron" if layer is given), n, count_pos,
    firing_rate, mean, std, min, max, top_value/top_index, bottom_value/bottom_index, top_doc/top_doc_value,
    n_docs (filled top_docs slots), n_sample, and for gated layers the quadrant counts q_pp, q_pn, q_np,
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
        n=[self.n] * d,
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
    if self.gated:
        q = np_(self.quadrant_count)
        for j, name in enumerate(("q_pp", "q_pn", "q_np", "q_nn")):
            cols[name] = q[:, j]
    return pd.DataFrame(cols)
