"""The run's tables against brute force: magnitude shares (m > τ, m < -τ, |m| > τ for τ a fraction of each
neuron's max |m|) within their stated bounds, exact where they say so; the layer figures; mass-L0."""

from __future__ import annotations

import pytest
import torch

import kvmem
from kvmem.profile import tables
from kvmem.profile.runner import ProfileConfig

SEQ, BATCH, K = 16, 3, 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "c.txt"
    docs = ["The built-in function abs returns the absolute value of a number.",
            "class attributes are looked up in the dictionary of the class. " * 6,
            "Exceptions are raised with the raise statement and handled with try.",
            "A for loop iterates over the items of any sequence; names are bound by assignment."]
    path.write_text("\n\n".join(docs))
    return path


def coefficients(model, run) -> dict[int, torch.Tensor]:
    """m [n_tokens, d_mlp] of every layer, computed in the run's own rows and batches."""
    ids = run.tokens.ids.long()
    n = run.tokens.n_tokens
    full = n // SEQ
    chunks = [ids[a * SEQ:min(a + BATCH, full) * SEQ].view(-1, SEQ) for a in range(0, full, BATCH)]
    chunks += [ids[full * SEQ:][None]] if n % SEQ else []
    out = {layer: [] for layer in range(model.n_layers)}
    for x in chunks:
        cap = kvmem.run_capture(model, x)
        for layer in out:
            out[layer].append(cap.coef[layer].reshape(-1, model.d_mlp).float())
    return {layer: torch.cat(v) for layer, v in out.items()}


def mass_counts(m: torch.Tensor, norms: torch.Tensor, f: float) -> torch.Tensor:
    """Per token [N]: the fewest neurons whose |m_i|·‖v_i‖ add up to at least f of the token's total."""
    w = (m.double().abs() * norms.double()).sort(dim=1, descending=True).values
    cum = w.cumsum(1)
    need = f * cum[:, -1:]
    return (cum < need).sum(1) + (need[:, 0] > 0).long()


class StandInMass:
    """The read-outs of LayerStats.mass, from brute-force counts (until the component lands)."""

    def __init__(self, counts: dict, pos: torch.Tensor, d_mlp: int, max_pos: int):
        self.counts, self.pos, self.d_mlp, self.max_pos = counts, pos, d_mlp, max_pos
        self.n = int(pos.numel())

    def mean(self, f):
        return float(self.counts[f].double().mean())

    def quantile(self, f, q):
        return tables._quantile(self.distribution(f), q)

    def distribution(self, f):
        return torch.bincount(self.counts[f], minlength=self.d_mlp + 1)

    def by_position(self, f):
        total = torch.zeros(self.max_pos, dtype=torch.float64).index_add_(0, self.pos, self.counts[f].double())
        n = torch.bincount(self.pos, minlength=self.max_pos).double()
        return torch.where(n > 0, total / n.clamp(min=1), torch.full_like(total, float("nan")))


class WithMass:
    """A LayerStats seen with a ``mass`` read-out attached."""

    def __init__(self, stats, mass):
        self._stats, self.mass = stats, mass

    def __getattr__(self, name):
        return getattr(self._stats, name)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def profiled(request, tmp_path_factory, corpus, tiny_models):
    model = tiny_models[request.param]
    # the legacy stream rows, position 0 kept: ``coefficients`` recomputes m in exactly the run's batches, so
    # the tables compare bit for bit (the rows themselves: tests/profile/test_profile.py, test_rows.py)
    cfg = ProfileConfig(corpus=str(corpus), seq_len=SEQ, batch_size=BATCH, top_k=K, checkpoint_every=1e9,
                        rows="stream", skip_first=False)
    run = kvmem.profile(cfg, tmp_path_factory.mktemp("runs") / request.param, model=model)
    return model, run, coefficients(model, run)


def test_magnitude_shares_within_their_bounds(profiled):
    model, run, acts = profiled
    n = run.tokens.n_tokens
    table = run.neurons
    exact = inexact = 0
    for layer, A in acts.items():
        s = run.stats[layer]
        rows = table[table.layer == layer].reset_index(drop=True)
        ma = torch.maximum(A.max(0).values, -A.min(0).values)
        assert torch.equal(torch.tensor(rows["max_abs"].to_numpy()), ma)
        for f in tables.FRACTIONS:
            p = tables.pct(f)
            t = ma * f  # float32, as the tables compare
            truth = {"pos": (A > t).double().mean(0), "neg": (A < -t).double().mean(0),
                     "active": (A.abs() > t).double().mean(0)}
            for kind, share in truth.items():
                est = torch.tensor(rows[f"{kind}_{p}pct_maxabs"].to_numpy())
                err = torch.tensor(rows[f"{kind}_{p}pct_maxabs_err"].to_numpy())
                assert ((est - share).abs() <= err + 1e-12).all(), (layer, kind, p)
                assert (err >= 0).all() and (est >= 0).all() and (est <= 1 + 1e-12).all()
                is_exact = err == 0
                assert ((est[is_exact] - share[is_exact]).abs() * n < 1e-6).all(), (layer, kind, p)
                exact += int(is_exact.sum())
                inexact += int((~is_exact).sum())
            # a neuron's own max |m| is never exceeded: nothing is active at 100%, and at 50% some token is
            assert (torch.tensor(rows[f"active_{p}pct_maxabs"].to_numpy()) * n >= 1 - 1e-9).all()
        # the m > 0 figures stay beside them
        assert rows["firing_rate"].to_numpy() == pytest.approx((A > 0).double().mean(0).numpy())
    assert exact > 0 and inexact > 0  # both paths are exercised
    # rare neurons (fewer tokens above τ than the store holds) are counted exactly
    assert (table["active_50pct_maxabs_err"] == 0).any()


def test_count_below_mirrors_count_above(profiled):
    _, run, acts = profiled
    s = run.stats[0]
    t = torch.full((s.d_mlp,), 0.05)
    up, up_err = tables.count_above(s, t)
    down, down_err = tables.count_below(s, t)
    A = acts[0]
    assert ((up - (A > t).sum(0)).abs() <= up_err).all()
    assert ((down - (A < -t).sum(0)).abs() <= down_err).all()
    # the histogram alone (no store to make it exact) keeps the same bound
    from kvmem.stats.hist import count_above

    est, bound = count_above(s.hist.flip(1), t)
    assert ((est - (A < -t).sum(0)).abs() <= bound).all()


def test_layer_table(profiled):
    model, run, acts = profiled
    layers = run.layers
    neurons = run.neurons
    assert len(layers) == model.n_layers
    for row in layers.itertuples():
        A = acts[row.layer]
        rows = neurons[neurons.layer == row.layer]
        ma = torch.maximum(A.max(0).values, -A.min(0).values)
        assert row.max_abs_activation == pytest.approx(float(ma.max()))
        assert row.max_abs_neuron == f"{row.layer}.{int(ma.argmax())}"
        for kind in ("active", "pos", "neg"):
            assert getattr(row, f"{kind}_10pct_maxabs") == pytest.approx(rows[f"{kind}_10pct_maxabs"].mean())
            assert getattr(row, f"{kind}_10pct_maxabs_err") == pytest.approx(rows[f"{kind}_10pct_maxabs_err"].mean())
        truth = (A.abs() > ma * 0.1).double().mean()
        assert abs(row.active_10pct_maxabs - float(truth)) <= row.active_10pct_maxabs_err + 1e-12
        assert row.dense_10pct == int((rows["active_10pct_maxabs"] > 0.5).sum())
        assert row.rare_10pct == int((rows["active_10pct_maxabs"] < 0.01).sum())
        assert row.firing_rate == pytest.approx((A > 0).double().mean())
        assert row.l0_mean == pytest.approx((A > 0).sum(1).double().mean())


def test_mass_figures(profiled):
    """mass{50,90}_{mean,median,p90} and the mass read-outs, against brute force over the captured m."""
    model, run, acts = profiled
    layers = run.layers
    pos = torch.arange(run.tokens.n_tokens) % SEQ
    for row in layers.itertuples():
        A, mass = acts[row.layer], run.stats[row.layer].mass
        norms = model.value_norms(row.layer).float()
        assert mass is not None and mass.n == run.tokens.n_tokens
        for f in tables.MASS:
            c = mass_counts(A, norms, f)
            p = tables.pct(f)
            assert torch.equal(mass.distribution(f), torch.bincount(c, minlength=model.d_mlp + 1))
            assert getattr(row, f"mass{p}_mean") == pytest.approx(c.double().mean().item())
            srt = c.sort().values
            assert getattr(row, f"mass{p}_median") == int(srt[(len(c) + 1) // 2 - 1])
            assert getattr(row, f"mass{p}_p90") == int(srt[int(torch.tensor(0.9 * len(c)).ceil()) - 1])
            assert 1 <= getattr(row, f"mass{p}_median") <= model.d_mlp
            expect = StandInMass({f: c}, pos, model.d_mlp, SEQ).by_position(f)
            torch.testing.assert_close(mass.by_position(f)[:SEQ].double(), expect[:SEQ], equal_nan=True)
        assert row.mass50_mean <= row.mass90_mean
    assert str(layers["mass50_median"].dtype) == "Int64"


def test_mass_figures_from_a_stand_in_and_without_mass(profiled):
    """layer_table reads only the documented read-outs of LayerStats.mass; a run without it keeps the
    columns, empty."""
    model, run, acts = profiled
    pos = torch.arange(run.tokens.n_tokens) % SEQ
    stats = {layer: WithMass(run.stats[layer], StandInMass({f: torch.full((len(pos),), 3 + layer) for f in tables.MASS},
                                                           pos, model.d_mlp, SEQ)) for layer in acts}
    layers = tables.layer_table(stats)
    assert layers["mass90_mean"].tolist() == [3.0 + layer for layer in acts]
    assert layers["mass50_p90"].tolist() == [3 + layer for layer in acts]
    bare = tables.layer_table({layer: WithMass(run.stats[layer], None) for layer in acts})
    assert bare["mass90_mean"].isna().all() and bare["mass90_p90"].isna().all()
    assert str(bare["mass90_p90"].dtype) == "Int64"
