"""mean / std / firing_rate / to_frame against direct computation."""

import numpy as np
import torch
from stats_reference import make_stream

from kvmem.stats import LayerStats


def test_moments_and_frame():
    st = make_stream(seed=31, n=1500, d=9, gated=True)
    s = st.feed(LayerStats(9, k=4, gated=True, max_pos=64))
    m = st.m.double()
    torch.testing.assert_close(s.mean(), m.mean(0), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.std(), m.std(0, unbiased=False), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(s.firing_rate(), (m > 0).double().mean(0))
    df = s.to_frame(layer=3)
    assert len(df) == 9 and list(df["neuron_id"][:2]) == ["3.0", "3.1"]
    assert {"n", "count_pos", "firing_rate", "mean", "std", "min", "max", "top_value", "top_index",
            "bottom_value", "bottom_index", "top_doc", "n_docs", "n_sample", "q_pp", "q_nn"} <= set(df.columns)
    np.testing.assert_array_equal(df["max"].to_numpy(), st.m.max(0).values.numpy())
    np.testing.assert_array_equal(df["top_index"].to_numpy(), s.top.index[:, 0].numpy())
    q = ((st.gate > 0) & (st.up > 0)).sum(0).numpy()
    np.testing.assert_array_equal(df["q_pp"].to_numpy(), q)
    assert (df["n"] == 1500).all()
    assert "layer" not in LayerStats(3).to_frame().columns


def test_empty_readouts():
    s = LayerStats(3, k=2)
    assert torch.isnan(s.mean()).all() and torch.isnan(s.std()).all() and torch.isnan(s.firing_rate()).all()
    assert (s.top.index == -1).all() and torch.isnan(s.top.value).all()
    assert (s.count_above(0.0) == 0).all()
