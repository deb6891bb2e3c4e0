"""Every registered component (kvmem.stats.registry) keeps the component contract on its own, on its torch
update: a state that round-trips and continues bit-identically, a merge of two halves equal to one pass,
key prefixes from the combination. Each component's values are checked against brute force in its own test
(test_layer.py for the stores, moments, histogram, counts and quadrants on both backends; test_mass.py)."""

import pytest
import torch
from stats_reference import make_stream

from kvmem.errors import KvmemError
from kvmem.stats import LayerStats, registry
from kvmem.stats.base import LayerSpec, Stat

K = 4


def _value_norm(d):
    return torch.linspace(0.5, 2.0, d)


def _alone(name, gated, d):
    """A LayerStats keeping only ``name`` (so its own update runs, not the fused pass)."""
    return LayerStats(d, k=K, gated=gated, max_pos=64, value_norm=_value_norm(d), components=[name])


def _params():
    for name in registry.COMPONENTS:
        for gated in (False, True):
            cls = registry.component_class(name)
            if cls.applies(LayerSpec(5, gated=gated, value_norm=torch.ones(5))):
                yield name, gated


@pytest.mark.parametrize("name,gated", list(_params()))
def test_component_state_roundtrip_and_merge(name, gated):
    st = make_stream(seed=3, n=900, d=7, gated=gated)
    whole = st.feed(_alone(name, gated, 7))
    sd = whole.state_dict()
    assert {k.split(".", 1)[0] for k in sd} == {"meta", name}
    # round trip, then continue: same as never stopping
    cut = len(st.bounds) // 2
    first = st.feed(_alone(name, gated, 7), order=list(range(cut)))
    resumed = LayerStats.from_state_dict(first.state_dict())
    assert list(resumed.parts) == [name]
    bs = list(st.batches())
    for i in range(cut, len(bs)):
        m, ti, doc, pos, g, u = bs[i]
        resumed.update(m, ti, doc, pos, gate=g, up=u)
    _same(resumed.state_dict(), sd, exact_sums=True)
    # two halves merged = one pass
    second = _alone(name, gated, 7)
    for i in range(cut, len(bs)):
        m, ti, doc, pos, g, u = bs[i]
        second.update(m, ti, doc, pos, gate=g, up=u)
    merged = st.feed(_alone(name, gated, 7), order=list(range(cut))).merge(second)
    _same(merged.state_dict(), sd, exact_sums=False)


def _same(a, b, exact_sums):
    assert a.keys() == b.keys()
    for key in a:
        if key.startswith("moments.") and not exact_sums:
            torch.testing.assert_close(a[key], b[key], rtol=1e-12, atol=1e-9)
        else:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key].nan_to_num(), b[key].nan_to_num()), key


def test_registry_is_the_combination():
    s = LayerStats(6, gated=True, value_norm=torch.ones(6))
    expected = [n for n in registry.COMPONENTS if registry.component_class(n).applies(s.spec)]
    assert list(s.parts) == expected
    assert "quadrants" not in LayerStats(6).parts
    assert all(isinstance(p, Stat) and p.name == n for n, p in s.parts.items())
    with pytest.raises(KvmemError):
        registry.component_class("nope")


def test_a_state_with_an_unknown_or_missing_statistic_is_refused():
    st = make_stream(seed=4, n=200, d=7)
    sd = st.feed(LayerStats(7, k=K, max_pos=64)).state_dict()
    with pytest.raises(KvmemError, match="does not know: zzz"):
        LayerStats.from_state_dict(sd | {"zzz.count": torch.zeros(3)})
    partial = LayerStats.from_state_dict({k: v for k, v in sd.items() if not k.startswith("hist.")})
    assert partial.missing() == ["hist"] and LayerStats.from_state_dict(sd).missing() == []


def test_format_1_state_is_read():
    """A state written by kvmem 0.2 (format 1: moments and counts without prefixes) loads unchanged."""
    st = make_stream(seed=5, n=300, d=7)
    s = st.feed(LayerStats(7, k=K, max_pos=64))
    sd = s.state_dict()
    v1 = {}
    back = {v: k for k, v in __import__("kvmem.stats.layer", fromlist=["x"])._V1_NAMES.items()}
    for k, t in sd.items():
        v1[back.get(k, k)] = t
    v1["meta.version"] = torch.tensor(1)
    old = LayerStats.from_state_dict(v1)
    _same(old.state_dict(), sd, exact_sums=True)
