"""sign_preserving_act (kvmem.stats.base.LayerSpec): the fused CPU pass takes up's sign from m's and
gate's wherever m != 0 and reads up only where m is 0. On SwiGLU data with exact zeros of gate and up
(both signs), gates so negative that silu underflows to -0.0, subnormal m, and products that underflow
to 0 with up != 0, the quadrants must equal the brute force and the flag-off run exactly."""

import numpy as np
import torch
from stats_reference import Stream, make_stream, quadrants_ref

from kvmem.profile.runner import sign_preserving
from kvmem.stats import LayerStats

K = 5


def swiglu_stream(seed: int = 3) -> Stream:
    st = make_stream(seed=seed, gated=True, n=1500, d=16)  # gate, up: multiples of 1/4 (exact zeros)
    g = torch.Generator().manual_seed(seed + 100)
    n, d = st.gate.shape
    gate, up = st.gate.clone(), st.up.clone()
    rows = lambda p: torch.rand(n, generator=g) < p  # noqa: E731
    r = rows(0.3)
    gate[r, 0] = -200.0  # silu(-200) = -0.0: m = -0.0 * up (±0.0) with up != 0
    r = rows(0.5)
    gate[r, 1] = -88.0 - 17.0 * torch.rand(int(r.sum()), generator=g)  # silu underflows into subnormals
    up[:, 2] = up[:, 2] * 1e-39  # subnormal up: subnormal or zero m
    gate[:, 3] = gate[:, 3] * 1e-20  # products that underflow to ±0 with gate, up != 0
    up[:, 3] = up[:, 3] * 1e-20
    up[rows(0.2), 4] = 0.0
    up[rows(0.2), 4] = -0.0
    gate[rows(0.2), 5] = -0.0
    m = torch.nn.functional.silu(gate) * up
    return Stream(m.contiguous(), st.ti, st.doc, st.pos, gate, up, st.bounds)


def test_stream_exercises_the_zeros():
    st = swiglu_stream()
    m, gate, up = st.m, st.gate, st.up
    zero = m == 0
    assert (zero & (up > 0)).any() and (zero & (up < 0)).any() and (zero & (gate != 0) & (up != 0)).any()
    assert (torch.signbit(m) & zero).any() and ((m != 0) & (m.abs() < 1.1754944e-38)).any()  # -0.0, subnormals
    # a derivation that used m's sign alone, or that also trusted it where m == 0, would be wrong here
    ref = quadrants_ref(m, st.ti, gate, up)[0]
    alone = quadrants_ref(m, st.ti, gate, (m > 0).float() - 0.5)[0]
    everywhere = quadrants_ref(m, st.ti, gate, ((m > 0) == (gate > 0)).float() - 0.5)[0]
    assert not np.array_equal(ref, alone) and not np.array_equal(ref, everywhere)


def test_signs_flag_matches_brute_force_and_flag_off(stats_path):
    st = swiglu_stream()
    d = st.m.shape[1]
    on = st.feed(LayerStats(d, k=K, gated=True, max_pos=64, sign_preserving_act=True))
    if stats_path == "fused":
        assert all(p.get("dense") == "fused" for p in st.paths)
    off = st.feed(LayerStats(d, k=K, gated=True, max_pos=64))
    counts, qv, qi = quadrants_ref(st.m, st.ti, st.gate, st.up)
    q = on.quadrants
    np.testing.assert_array_equal(q.count.numpy(), counts)
    np.testing.assert_array_equal(q.index.numpy(), qi)
    np.testing.assert_array_equal(q.value.numpy(), qv)
    a, b = on.state_dict(), off.state_dict()
    assert a.keys() == b.keys()
    assert not any("sign" in key for key in a)  # a run-time property of the model, not state
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_sign_preserving_names():
    class M:
        def __init__(self, act):
            self.activation = act

    for act in ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        assert sign_preserving(M(act))
    for act in ("tanh", "sigmoid", "relu2", "quick_gelu_x", ""):
        assert not sign_preserving(M(act))
    assert not sign_preserving(object())
