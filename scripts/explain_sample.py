"""Describe and score a seeded sample of a run's neurons with the in-process explainer and the baseline, in
chunks, writing RUN/explanations.parquet after each chunk, until done or a deadline; then summarise.

    python scripts/explain_sample.py RUN --sample 100 --seed 0 --chunk 4 --deadline 07:20 [--local smollm2-135m]
    python scripts/explain_sample.py RUN --summary-only

The sample is kvmem.explain.select(run, sample=N, seed=SEED) (what ``kvmem explain --sample N --seed SEED``
takes), visited in an order shuffled with the same seed, so the neurons done by a deadline are themselves a
seeded random subset of the sample. Each chunk is what ``kvmem explain RUN --neurons ... --local MODEL
--score`` does (one model load for all chunks). The summary (``summary``): per explainer and scorer, the mean
score over the neurons' rows with a t interval (95%) and a percentile bootstrap interval over neurons (2000
draws, seeded), n rows and n neurons; rows whose score is NaN are counted and left out.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pandas as pd


def summary(df: pd.DataFrame, neurons: list[str] | None = None, seed: int = 0) -> pd.DataFrame:
    from scipy import stats as st

    from kvmem.explain.store import SCORERS, side_of

    if neurons is not None:
        df = df[df.neuron.isin(neurons)]
    out = []
    rng = np.random.default_rng(seed)
    for explainer in sorted(df.explainer.unique(), key=lambda e: (e == "baseline", e)):
        for s in SCORERS:
            rows = df[(df.explainer == explainer) & (df.side == side_of(s))]
            ok = rows[rows[s].notna()]
            x = ok[s].to_numpy(dtype=float)
            rec = {"explainer": explainer, "scorer": s, "rows": len(rows), "scored": len(ok),
                   "neurons": ok.neuron.nunique(), "mean": math.nan, "t_lo": math.nan, "t_hi": math.nan,
                   "boot_lo": math.nan, "boot_hi": math.nan, "items_per_row": math.nan}
            if len(x) >= 2:
                m, se = x.mean(), x.std(ddof=1) / math.sqrt(len(x))
                h = st.t.ppf(0.975, len(x) - 1) * se
                # bootstrap over neurons (a gated neuron's two signs stay together)
                groups = [g[s].to_numpy(dtype=float) for _, g in ok.groupby("neuron")]
                reps = []
                for _ in range(2000):
                    pick = rng.integers(0, len(groups), len(groups))
                    reps.append(np.concatenate([groups[i] for i in pick]).mean())
                rec.update(mean=m, t_lo=m - h, t_hi=m + h, boot_lo=float(np.quantile(reps, 0.025)),
                           boot_hi=float(np.quantile(reps, 0.975)), items_per_row=float(ok[f"{s}_n"].mean()))
            elif len(x) == 1:
                rec.update(mean=float(x[0]), items_per_row=float(ok[f"{s}_n"].mean()))
            notes = rows[rows[s].isna()][f"{s}_note"].value_counts()
            rec["nan_reasons"] = "; ".join(f"{k} ({v})" for k, v in notes.items()) if len(notes) else ""
            out.append(rec)
    return pd.DataFrame(out)


def paired(df: pd.DataFrame, explainer: str, neurons: list[str] | None = None) -> pd.DataFrame:
    """Per scorer: the mean of (explainer's score - the baseline's) over rows of the same neuron, side and sign
    where both are scored, with a 95% t interval; n pairs."""
    from scipy import stats as st

    from kvmem.explain.store import SCORERS, side_of

    if neurons is not None:
        df = df[df.neuron.isin(neurons)]
    out = []
    for s in SCORERS:
        rows = df[df.side == side_of(s)]
        a = rows[rows.explainer == explainer].set_index(["neuron", "sign"])[s]
        b = rows[rows.explainer == "baseline"].set_index(["neuron", "sign"])[s]
        d = (a - b.reindex(a.index)).dropna().to_numpy(dtype=float)
        rec = {"scorer": s, "pairs": len(d), "diff": math.nan, "lo": math.nan, "hi": math.nan}
        if len(d) >= 2:
            h = st.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
            rec.update(diff=d.mean(), lo=d.mean() - h, hi=d.mean() + h)
        out.append(rec)
    return pd.DataFrame(out)


def markdown(t: pd.DataFrame) -> str:
    lines = ["| explainer | scorer | mean | 95% t interval | 95% bootstrap (neurons) | rows scored / rows | neurons "
             "| items per row | NaN rows |", "|---|---|---|---|---|---|---|---|---|"]
    for r in t.itertuples():
        f = (lambda v: "—" if math.isnan(v) else f"{v:.3f}")
        lines.append(f"| {r.explainer} | {r.scorer} | {f(r.mean)} | [{f(r.t_lo)}, {f(r.t_hi)}] | "
                     f"[{f(r.boot_lo)}, {f(r.boot_hi)}] | {r.scored} / {r.rows} | {r.neurons} | "
                     f"{'—' if math.isnan(r.items_per_row) else f'{r.items_per_row:.1f}'} | {r.nan_reasons} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--sample", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chunk", type=int, default=4)
    ap.add_argument("--local", default="smollm2-135m")
    ap.add_argument("--deadline", default=None, help="HH:MM UTC: start no chunk after it")
    ap.add_argument("--summary-only", action="store_true")
    a = ap.parse_args(argv)

    import kvmem
    from kvmem.explain import select, store
    from kvmem.explain.backends import LocalBackend
    from kvmem.explain.cache import Cache
    from kvmem.explain.explainer import ExplainConfig, explain

    run = kvmem.open_run(a.run)
    pairs = select(run, None, None, a.sample, a.seed)
    order = [pairs[i] for i in np.random.default_rng(a.seed).permutation(len(pairs))]
    ids = [f"{layer}.{n}" for layer, n in order]
    if not a.summary_only:
        model = kvmem.load(run.model_spec)
        backend = LocalBackend(a.local, model=model if a.local == run.model_spec else None, seed=a.seed)
        cfg, cache = ExplainConfig(seed=a.seed), Cache(run.path)
        old = store.read(run)
        done = set(old[old.explainer == a.local].neuron)  # a re-run continues where the last one stopped
        t0 = time.time()
        for start in range(0, len(order), a.chunk):
            chunk = [p for p in order[start:start + a.chunk] if f"{p[0]}.{p[1]}" not in done]
            now = datetime.now(timezone.utc)
            if a.deadline and now.strftime("%H:%M") >= a.deadline:
                print(f"{now:%H:%M:%S} deadline {a.deadline} reached: stopping before neuron {start}", flush=True)
                break
            if not chunk:
                continue
            df = explain(run, model, chunk, backend, cfg, score=True, cache=cache)
            store.write(run, store.merge(store.read(run), df))
            print(f"{datetime.now(timezone.utc):%H:%M:%S} neurons {start + len(chunk)}/{len(order)} "
                  f"({time.time() - t0:.0f} s; {backend.usage})", flush=True)
    df = store.read(run)
    done_ids = [i for i in ids if i in set(df[df.explainer == a.local].neuron)]
    print(f"neurons described by {a.local}: {len(done_ids)} of the seeded sample of {len(ids)} (seed {a.seed})")
    t = summary(df, done_ids, a.seed)
    print(markdown(t))
    d = paired(df, a.local, done_ids)
    print(f"\n{a.local} minus baseline, same neuron, side and sign (mean difference, 95% t interval, n pairs):")
    for r in d.itertuples():
        print(f"- {r.scorer}: {r.diff:+.3f} [{r.lo:+.3f}, {r.hi:+.3f}], n = {r.pairs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
