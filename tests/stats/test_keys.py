"""Order-preserving keys and the sample hash."""

import torch

from kvmem.stats.keys import (
    EMPTY,
    MAX_TOKEN_INDEX,
    decode_index,
    decode_value,
    encode,
    hash32,
    mono32,
    sample_priority,
)


def special_values():
    tiny = torch.tensor([1e-45, 1e-40, 1.1754942e-38], dtype=torch.float32)
    base = torch.tensor([0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 3e38, -3e38, float("inf"), float("-inf")])
    return torch.cat([base, tiny, -tiny, torch.randn(500) * 10 ** torch.randint(-30, 30, (500,)).float()])


def test_mono32_preserves_order_and_folds_zero():
    v = special_values()
    k = mono32(v).long()
    a, b = v[:, None], v[None, :]
    ka, kb = k[:, None], k[None, :]
    assert torch.equal(ka < kb, a < b)
    assert torch.equal(ka == kb, a == b)  # -0.0 == 0.0 tie
    assert torch.equal(decode_value(encode(v, torch.zeros_like(v, dtype=torch.int64))), v + 0.0)


def test_keys_order_value_then_lower_index():
    v = torch.tensor([1.0, 1.0, -0.0, 0.0, 2.0, -3.0])
    ti = torch.tensor([5, 3, 9, 4, 0, MAX_TOKEN_INDEX])
    key = encode(v, ti)
    order = torch.argsort(key, descending=True)
    assert ti[order].tolist() == [0, 3, 5, 4, 9, MAX_TOKEN_INDEX]
    assert torch.equal(decode_index(key), ti)
    assert (key > EMPTY).all()
    e = torch.tensor([EMPTY])
    assert decode_index(e).item() == -1 and torch.isnan(decode_value(e)).all()


def test_hash_is_a_bijection_and_spreads():
    x = torch.arange(1 << 16) * 65537 + 12345
    h = hash32(x)
    assert h.unique().numel() == x.numel()
    assert (h >= 0).all() and (h < 2**32).all()
    # consecutive inputs give well-mixed outputs: each top bit is set about half the time
    bits = torch.stack([(h >> b) & 1 for b in range(24, 32)]).float().mean(1)
    assert ((bits - 0.5).abs() < 0.02).all()


def test_sample_priority_is_uniform_per_neuron():
    """The top-k by priority of 0..n-1 is a uniform sample: over many neurons, each position of the
    stream is picked about equally often (positions binned into 10 deciles)."""
    n, k, d = 2000, 20, 500
    ti = torch.arange(n)
    prio = sample_priority(ti[:, None], torch.arange(d)[None, :])  # [n, d]
    top = torch.topk(prio, k, dim=0).indices  # [k, d]
    decile = torch.bincount((top // (n // 10)).reshape(-1), minlength=10).float()
    expected = k * d / 10
    chi2 = ((decile - expected) ** 2 / expected).sum()
    assert chi2 < 30  # 9 dof: p < 0.001 only if far from uniform
    # different neurons pick different tokens
    overlap = (top[:, 0:1, None] == top[None, :, 1:2]).any(0).sum()
    assert overlap < k
