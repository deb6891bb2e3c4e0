"""The run's tables, built from the statistics: one row per neuron, one row per layer.

Two kinds of figures, side by side for every family, so that models can be compared:

- **sign** (m > 0): firing rate, dead and dense neurons, L0 (exact counts). Meaningful for ReLU/GELU,
  where m > 0 is "on"; for gated FFNs (SwiGLU, GeGLU) m = act(gate)·up is sign-symmetric and about half
  of all coefficients are > 0 whatever the neuron does.
- **magnitude** (|m| against τ = a fraction of the neuron's own max |m|): ``pos_{p}pct_maxabs`` is the
  share of tokens with m > τ, ``neg_{p}pct_maxabs`` with m < -τ, ``active_{p}pct_maxabs`` with |m| > τ
  (their sum), for τ = 1%, 10% (the headline) and 50% of max |m|. One pass cannot count against a max
  that is only known at the end, so the counts come from the activation histogram (kvmem.stats.hist)
  with a bound ``..._err``: the true share lies within it of the estimate. They are exact (``_err`` 0)
  where the exact top-k (bottom-k) store holds every token above τ (below -τ), which is the case for
  rare neurons and most 50% thresholds.
- **mass-L0** per token (layers table, from ``LayerStats.mass``; None for runs of older kvmem): the
  number of neurons that carry 50% / 90% of Σ_i |m_i|·‖v_i‖ at a token (an L0 that means something
  when coefficients are dense): mean, median and 90th percentile over tokens.
- **mixture-of-experts layers**: every neuron figure is relative to the tokens routed to the neuron's expert
  (``n`` is their number, kvmem.stats.layer), ids print as ``layer.eE.N`` / ``layer.sS.N`` (NeuronId), and
  the routing table has one row per (layer, routed expert) (kvmem.stats.routing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import torch

from kvmem.neurons import NeuronId
from kvmem.stats.readout import expert_columns

from kvmem.stats.mass import FRACTIONS as MASS  # shares of Σ_i |m_i|·‖v_i‖ for mass-L0

if TYPE_CHECKING:
    from kvmem.profile.tokens import TokenStore

FRACTIONS = (0.01, 0.1, 0.5)  # τ as fractions of each neuron's max |m|
HEADLINE = 0.1  # the τ of the headline figures (summary, overview, layers table)
DENSE, RARE = 0.5, 0.01  # dense: active on more than half of the tokens; rare: on less than 1%
CONTEXT_BEFORE = 6


def pct(f: float) -> int:
    """0.1 -> 10 (the column-name spelling of a fraction)."""
    return round(f * 100)


def max_abs(s) -> torch.Tensor:
    """max |m| per neuron = max(max, -min), float32 [d] (0 before any token)."""
    return torch.maximum(s.max.nan_to_num(0.0), (-s.min).nan_to_num(0.0)).clamp(min=0.0)


def _exact_where_stored(values: torch.Tensor, est: torch.Tensor, bound: torch.Tensor, t: torch.Tensor):
    """Tokens with x > t per neuron (t [d] >= 0), with the bound: the histogram's estimate (est, bound),
    made exact where the exact store of the largest x holds every x > t (its last slot is empty or <= t),
    and kept within the store's lower bound (k tokens) otherwise.

    values: that store's values [d, k] (NaN in empty slots, largest first).
    Returns (estimate float64 [d], bound float64 [d])."""
    v = values.float().cpu()
    t = t.float().cpu()
    k = v.shape[1]
    in_store = (v > t[:, None]).sum(1).double()  # NaN compares False
    last = v[:, -1]
    complete = torch.isnan(last) | (last <= t)
    # otherwise every slot is above t, so the truth is >= k too: an estimate raised to k stays within the
    # bound (truth in [k, est + bound])
    est, bound = est.cpu().clamp(min=float(k)), bound.cpu()
    return torch.where(complete, in_store, est), torch.where(complete, torch.zeros_like(bound), bound)


def count_above(s, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with m > t per neuron (t [d] >= 0): (estimate, bound) float64 [d], from the histogram
    (LayerStats.count_above), exact where the top store holds every such token."""
    return _exact_where_stored(s.top.value, *s.count_above(t, return_bound=True), t)


def count_below(s, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens with m < -t per neuron (t [d] >= 0): (estimate, bound) float64 [d], from the histogram's
    mirror image (LayerStats.count_below), exact where the bottom store (the top store of -m) holds every
    such token."""
    return _exact_where_stored(-s.bottom.value, *s.count_below(t, return_bound=True), t)


def magnitude_shares(s, fractions=FRACTIONS) -> dict[str, torch.Tensor]:
    """Per neuron, for each fraction f: shares of tokens with m > f·max|m| (pos), m < -f·max|m| (neg) and
    |m| > f·max|m| (active), each with its bound (``_err``); and max_abs. float64 [d] (float32 max_abs).
    A neuron whose m is 0 on every token is active on none (exactly)."""
    n = s.neuron_n().cpu().clamp(min=1).double()  # MoE layers: the tokens routed to the neuron's expert
    ma = max_abs(s).cpu()
    zero = ma == 0
    out: dict[str, torch.Tensor] = {"max_abs": ma}
    for f in fractions:
        t = ma * f  # float32, as the histogram compares
        p = pct(f)
        pos, pos_err = count_above(s, t)
        neg, neg_err = count_below(s, t)
        for name, value in (("pos", pos), ("pos_err", pos_err), ("neg", neg), ("neg_err", neg_err)):
            out[name + str(p)] = torch.where(zero, torch.zeros_like(value), value) / n
        out[f"active{p}"] = out[f"pos{p}"] + out[f"neg{p}"]
        out[f"active_err{p}"] = out[f"pos_err{p}"] + out[f"neg_err{p}"]
    return out


def magnitude_frame(s, fractions=FRACTIONS) -> pd.DataFrame:
    """The magnitude columns of the neuron table for one layer (see the module docstring)."""
    sh = magnitude_shares(s, fractions)
    cols = {"max_abs": sh["max_abs"].numpy()}
    for f in fractions:
        p = pct(f)
        for kind in ("pos", "neg", "active"):
            cols[f"{kind}_{p}pct_maxabs"] = sh[f"{kind}{p}"].numpy()
            cols[f"{kind}_{p}pct_maxabs_err"] = sh[f"{kind}_err{p}"].numpy()
    return pd.DataFrame(cols)


def _context_strings(store, index: torch.Tensor, vocab: list[str]) -> tuple[list[str], list[str]]:
    """The activating token and a short marked context for each index [n] (-1: none)."""
    valid = index >= 0
    idx = torch.where(valid, index, store.offset)
    doc_start = store.doc_start(idx)
    window = idx[:, None] + torch.arange(-CONTEXT_BEFORE, 1)  # [n, CONTEXT_BEFORE + 1] global indices
    inside = window >= doc_start[:, None]
    ids = store.ids[(window - store.offset).clamp(min=0)].tolist()
    tokens, contexts = [], []
    for ok, row, mask in zip(valid.tolist(), ids, inside.tolist()):  # one string per neuron, once per run
        if not ok:
            tokens.append("")
            contexts.append("")
            continue
        words = [vocab[t] for t, m in zip(row, mask) if m]
        tokens.append(words[-1])
        contexts.append("".join(words[:-1]) + "⟦" + words[-1] + "⟧")
    return tokens, contexts


MOE_NEURON_FILL = {"expert": -1, "shared": False, "expert_share": 1.0}  # dense layers' rows of an MoE run


def neuron_table(stats: dict, store: TokenStore, vocab: list[str]) -> pd.DataFrame:
    """One row per (layer, neuron): m > 0 rate, moments, magnitude shares with bounds, top example; with MoE
    layers also expert, shared, expert_neuron, expert_share (dense layers' rows: expert -1, the neuron)."""
    frames = []
    for layer, s in stats.items():
        df = s.to_frame(layer).rename(columns={"neuron_id": "id"})
        df = pd.concat([df, magnitude_frame(s)], axis=1)
        df["top_token"], df["top_context"] = _context_strings(store, s.top.index[:, 0].cpu(), vocab)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    if any(s.moe for s in stats.values()):
        for col, fill in MOE_NEURON_FILL.items():
            out[col] = out[col].fillna(fill).astype(type(fill))
        out["expert_neuron"] = out["expert_neuron"].fillna(out["neuron"]).astype("int64")
        for col in ("q_pp", "q_pn", "q_np", "q_nn"):  # gated dense layers beside MoE ones: experts keep none
            if col in out:
                out[col] = out[col].fillna(-1).astype("int64")
    return out


def neuron_label(s, layer: int, i: int) -> str:
    """The id of flat neuron i of a layer's statistics s, as NeuronId prints it."""
    if not s.moe:
        return str(NeuronId(int(layer), int(i)))
    c = expert_columns(s.spec.expert_of.cpu())
    return str(NeuronId(int(layer), int(c["expert_neuron"][i]), int(c["expert"][i]), bool(c["shared"][i])))


def routing_table(stats: dict) -> pd.DataFrame:
    """One row per (MoE layer, routed expert): kvmem.stats.routing.Routing.table() with the layer and the
    co-selection row (``coselected``: tokens routed to both this expert and expert j, for every j)."""
    frames = []
    for layer, s in stats.items():
        if not s.moe:
            continue
        t = s.routing.table()
        t.insert(0, "layer", int(layer))
        t["coselected"] = [row for row in s.routing.cosel.cpu().tolist()]
        frames.append(t)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def moe_layer_row(s) -> dict:
    """The routing summary of an MoE layer for the layers table (NaN / null for dense layers)."""
    if not s.moe:
        return {"n_experts": None, "top_k": float("nan"), "router_entropy_mean": float("nan"),
                "router_entropy_std": float("nan"), "router_entropy_max": float("nan"),
                "sel_entropy_mean": float("nan"), "sel_entropy_std": float("nan"), "sel_entropy_max": float("nan")}
    sm = s.routing.summary()
    return {"n_experts": sm["n_experts"], "top_k": sm["top_k"], "router_entropy_mean": sm["entropy_mean"],
            "router_entropy_std": sm["entropy_std"], "router_entropy_max": sm["entropy_max"],
            "sel_entropy_mean": sm["sel_entropy_mean"], "sel_entropy_std": sm["sel_entropy_std"],
            "sel_entropy_max": sm["sel_entropy_max"]}


def _quantile(hist: torch.Tensor, q: float) -> int:
    """The q-quantile of a count histogram [m + 1] (tokens by count): the smallest count c with
    P(X <= c) >= q."""
    cdf = hist.double().cumsum(0) / hist.sum().clamp(min=1)
    return int(torch.searchsorted(cdf, torch.tensor([q], dtype=torch.float64))[0])


def mass_row(s) -> dict:
    """mass{50,90}_{mean,median,p90} of one layer (None when the run kept no mass statistic)."""
    row: dict = {}
    mass = s.mass
    for f in MASS:
        p = pct(f)
        if mass is None or not mass.n:
            row.update({f"mass{p}_mean": float("nan"), f"mass{p}_median": None, f"mass{p}_p90": None})
        else:
            row.update({f"mass{p}_mean": float(mass.mean(f)), f"mass{p}_median": int(mass.quantile(f, 0.5)),
                        f"mass{p}_p90": int(mass.quantile(f, 0.9))})
    return row


def layer_table(stats: dict) -> pd.DataFrame:
    """One row per layer: the m > 0 figures (firing rate, dead, dense, L0), the magnitude figures at
    τ = 10% of each neuron's max |m| (mean shares with their bounds, dense and rare neurons, the max |m|
    outlier) and mass-L0 (see the module docstring)."""
    rows = []
    p = pct(HEADLINE)
    for layer, s in stats.items():
        rate = s.firing_rate().cpu()
        hist = s.l0_hist.double().cpu()
        counts = torch.arange(hist.numel(), dtype=torch.float64)
        total = hist.sum().clamp(min=1)
        sh = magnitude_shares(s, (HEADLINE,))
        active, ma = sh[f"active{p}"], sh["max_abs"]
        row = {
            "layer": layer, "d_mlp": int(rate.numel()), "n_tokens": int(s.n),
            "firing_rate": float(rate.nanmean()), "dead": int((rate == 0).sum()), "dense": int((rate > 0.5).sum()),
            "densest": neuron_label(s, layer, int(rate.nan_to_num(-1.0).argmax())),
            "densest_rate": float(rate.nan_to_num(-1.0).max()),
            "l0_mean": float((hist * counts).sum() / total),
            "l0_median": _quantile(hist, 0.5),
            "l0_p90": _quantile(hist, 0.9),
            "max_activation": float(s.max.nan_to_num(float("-inf")).max()),
        }
        for kind in ("active", "pos", "neg"):
            row[f"{kind}_{p}pct_maxabs"] = float(sh[f"{kind}{p}"].mean())
            row[f"{kind}_{p}pct_maxabs_err"] = float(sh[f"{kind}_err{p}"].mean())
        row.update({
            f"dense_{p}pct": int((active > DENSE).sum()), f"rare_{p}pct": int((active < RARE).sum()),
            "max_abs_activation": float(ma.max()), "max_abs_neuron": neuron_label(s, layer, int(ma.argmax())),
        })
        row.update(mass_row(s))
        if any(x.moe for x in stats.values()):
            row.update(moe_layer_row(s))
        if s.gated:
            q = s.quadrant_count.double().sum(0).cpu()
            q = q / q.sum().clamp(min=1)
            row.update(gate_pos_up_pos=float(q[0]), gate_pos_up_neg=float(q[1]),
                       gate_neg_up_pos=float(q[2]), gate_neg_up_neg=float(q[3]))
        rows.append(row)
    df = pd.DataFrame(rows)
    if "n_experts" in df:
        df["n_experts"] = df["n_experts"].astype("Int64")
    for f in MASS:
        for stat in ("median", "p90"):
            df[f"mass{pct(f)}_{stat}"] = df[f"mass{pct(f)}_{stat}"].astype("Int64")
    return df
