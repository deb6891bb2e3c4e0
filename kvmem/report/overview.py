"""What the overview page needs beyond the run's tables: the mass-L0 distributions and means by position
(from each layer's ``LayerStats.mass``), and the magnitude columns of the neuron table.

Magnitude figures use τ = 10% of each neuron's max |m| (kvmem.profile.tables.HEADLINE); mass-L0 is the
number of neurons carrying 50% / 90% of Σ_i |m_i|·‖v_i‖ at a token (kvmem.profile.tables.MASS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvmem.profile import tables

if TYPE_CHECKING:
    from kvmem.profile.run import Run


def mass_data(run: Run) -> dict | None:
    """{"distribution": {layer: {f: tokens by mass-L0 [d_mlp + 1]}}, "by_position": {layer: {f: mean mass-L0
    by position [max_pos] (NaN: no token)}}} for f in (0.5, 0.9), as numpy arrays; None when the run kept
    no mass statistic (profiled by an older kvmem) in some layer."""
    dist, by_pos = {}, {}
    for layer, s in run.stats.items():
        mass = s.mass
        if mass is None or not mass.n:
            return None
        dist[layer] = {f: mass.distribution(f).cpu().numpy() for f in tables.MASS}
        by_pos[layer] = {f: mass.by_position(f).cpu().double().numpy() for f in tables.MASS}
    return {"distribution": dist, "by_position": by_pos} if dist else None


def _round(x, digits: int = 3) -> list:
    """Floats to ``digits`` significant digits (NaN -> 0), as a list."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float64), nan=0.0)
    mag = np.where(x == 0, 0.0, np.floor(np.log10(np.abs(np.where(x == 0, 1.0, x)))))
    scale = 10.0 ** (digits - 1 - mag)
    return (np.round(x * scale) / scale).tolist()


def neuron_columns(neurons) -> dict[str, list]:
    """The magnitude columns of the overview's neuron table, in the row order of ``neurons`` (run.neurons):
    act (share of tokens with |m| > τ), act_err (its bound), pos (m > τ), neg (m < -τ), maxabs (max |m|)."""
    p = tables.pct(tables.HEADLINE)
    return {"act": _round(neurons[f"active_{p}pct_maxabs"]), "act_err": _round(neurons[f"active_{p}pct_maxabs_err"], 2),
            "pos": _round(neurons[f"pos_{p}pct_maxabs"]), "neg": _round(neurons[f"neg_{p}pct_maxabs"]),
            "maxabs": _round(neurons["max_abs"], 4)}
