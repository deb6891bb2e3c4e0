"""NeuronId: parse, format back, order; parse_neuron keeps its behaviour for dense ids."""

import pytest

from kvmem.errors import KvmemError
from kvmem.neurons import NeuronId, neuron_id, parse_layers, parse_neuron


@pytest.mark.parametrize("text, expected", [
    ("12.345", NeuronId(12, 345)),
    ("0.0", NeuronId(0, 0)),
    ("12.e3.45", NeuronId(12, 45, expert=3)),
    ("12.s0.45", NeuronId(12, 45, expert=0, shared=True)),
    (" 7.e10.2 ", NeuronId(7, 2, expert=10)),
])
def test_parse_and_format_back(text, expected):
    nid = NeuronId.parse(text)
    assert nid == expected and nid.dense == (expected.expert is None)
    assert str(nid) == text.strip() and NeuronId.parse(str(nid)) == nid
    assert neuron_id(nid.layer, nid.neuron, nid.expert, nid.shared) == text.strip()


@pytest.mark.parametrize("text", ["", "12", "12.", ".3", "12.x", "12.e.4", "12.e3", "12.3.4", "12.E3.4", "-1.2",
                                  "12.s.4", "1.2.e3", "12.e3.4.5"])
def test_malformed_ids_are_refused(text):
    with pytest.raises(KvmemError, match="malformed neuron"):
        NeuronId.parse(text)


def test_ids_are_hashable_ordered_and_validated():
    ids = {NeuronId.parse("2.1"), NeuronId.parse("2.1"), NeuronId.parse("1.9")}
    assert sorted(ids) == [NeuronId(1, 9), NeuronId(2, 1)]
    with pytest.raises(KvmemError):
        NeuronId(1, 2, shared=True)
    with pytest.raises(KvmemError):
        NeuronId(-1, 2)
    with pytest.raises(KvmemError, match="layer 3 out of range"):
        NeuronId(3, 0).check(n_layers=3)
    with pytest.raises(KvmemError, match="index 48 out of range"):
        NeuronId(0, 48).check(n_layers=3, d_mlp=48)


def test_parse_neuron_dense_behaviour_unchanged():
    assert parse_neuron("17.1234") == (17, 1234)
    assert parse_neuron(" 1.2 ", 3, 48) == (1, 2)
    with pytest.raises(KvmemError, match="malformed neuron"):
        parse_neuron("1-2")
    with pytest.raises(KvmemError, match="layer 3 out of range"):
        parse_neuron("3.0", 3, 48)
    with pytest.raises(KvmemError, match="index 48 out of range"):
        parse_neuron("0.48", 3, 48)
    with pytest.raises(KvmemError, match="expert neuron"):  # dense commands refuse expert ids by name
        parse_neuron("1.e2.3", 3, 48)
    assert parse_layers("0-1,-1", 3) == [0, 1, 2] and parse_layers("", 3) is None
