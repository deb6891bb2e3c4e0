"""Order-preserving int64 keys and the hashes behind the random sample.

A key packs a float32 value and a global token index into one int64 whose integer order is
(value ascending, then token index *descending*):

    key = mono32(value) * 2**32 + (2**32 - 1 - token_index)

so the largest key is the largest value and, among equal values, the lowest token index. Integer
``topk``/``sort``/``scatter_reduce(amax)`` on keys are therefore exact and deterministic, and the value
and the index decode back out of the key. ``mono32`` maps float32 bits to an int32 with the same order
(-0.0 is folded onto +0.0 first, so the two zeros tie and the token index decides). ``EMPTY`` (int64 min)
marks an empty slot; it decodes to NaN and index -1. Token indices must lie in [0, 2**32 - 2].

Sample priorities: ``p(t, n) = (hash32(t) + hash32'(n)) mod 2**32``. For a fixed neuron this is a bijection
of the token index (both mixers are bijections of 32-bit integers), so ranking tokens by it is a uniform
random permutation and the top-k by priority is a uniform sample without replacement, mergeable exactly.
"""

from __future__ import annotations

import torch

EMPTY = -(2**63)
LOW = 2**32 - 1  # low 32 bits of a key: LOW - token_index
MAX_TOKEN_INDEX = 2**32 - 2
_SIGN_OFF = 0x7FFFFFFF
_NEURON_SALT = 0x5BD1E995


def mono32(v: torch.Tensor) -> torch.Tensor:
    """float32 [...] -> int32 [...] with the same order (NaN excluded; -0.0 -> the image of +0.0)."""
    b = (v.to(torch.float32) + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return b ^ ((b >> 31) & _SIGN_OFF)


def unmono32(i: torch.Tensor) -> torch.Tensor:
    """Inverse of ``mono32``: int32 [...] -> float32 [...] (the map is an involution on the bits)."""
    return (i ^ ((i >> 31) & _SIGN_OFF)).view(torch.float32)


def encode(value: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """float32 values and int64 token indices (broadcastable) -> int64 keys."""
    return mono32(value).to(torch.int64) * (2**32) + (LOW - token_index)


def encode_high(high: torch.Tensor, token_index: torch.Tensor) -> torch.Tensor:
    """A signed 32-bit ordering quantity (held in int64) and token indices -> int64 keys."""
    return high * (2**32) + (LOW - token_index)


def key_high(key: torch.Tensor) -> torch.Tensor:
    """The signed high 32 bits of keys, as int64."""
    return key >> 32


def decode_value(key: torch.Tensor) -> torch.Tensor:
    """int64 keys -> float32 values (NaN for EMPTY)."""
    return unmono32((key >> 32).to(torch.int32))


def decode_index(key: torch.Tensor) -> torch.Tensor:
    """int64 keys -> int64 token indices (-1 for EMPTY)."""
    idx = LOW - (key & LOW)
    return torch.where(key == EMPTY, torch.full_like(idx, -1), idx)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective mixer of 32-bit unsigned integers held in int64 [...] -> int64 in [0, 2**32).

    xorshift-multiply rounds (odd multipliers below 2**31, so no int64 product overflows)."""
    x = x & LOW
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & LOW
    x = x ^ (x >> 15)
    x = (x * 0x31848BAB) & LOW
    x = x ^ (x >> 16)
    x = (x * 0x2C1B3C6D) & LOW
    return x ^ (x >> 17)


def token_hash(token_index: torch.Tensor) -> torch.Tensor:
    """hash32 of global token indices [N] -> int64 [N] in [0, 2**32)."""
    return hash32(token_index)


def neuron_hash(neuron: torch.Tensor) -> torch.Tensor:
    """A per-neuron offset in [0, 2**32) for the sample priority."""
    return hash32(neuron ^ _NEURON_SALT)


def sample_priority(token_index: torch.Tensor, neuron: torch.Tensor) -> torch.Tensor:
    """The sample priority p(t, n) in [0, 2**32) (int64), broadcasting token_index against neuron."""
    return (token_hash(token_index) + neuron_hash(neuron)) & LOW


def sample_key(token_index: torch.Tensor, neuron: torch.Tensor) -> torch.Tensor:
    """int64 sample keys: priority (shifted to signed) in the high half, token index in the low half."""
    return encode_high(sample_priority(token_index, neuron) - 2**31, token_index)


def next_down(x: torch.Tensor) -> torch.Tensor:
    """The largest float32 below x (elementwise); ``m > next_down(x)`` is ``m >= x``."""
    return torch.nextafter(x, torch.full_like(x, float("-inf")))


def next_up(x: torch.Tensor) -> torch.Tensor:
    """The smallest float32 above x (elementwise); ``m < next_up(x)`` is ``m <= x``."""
    return torch.nextafter(x, torch.full_like(x, float("inf")))
