"""LayerStats works inside and outside torch.inference_mode, in either order (shared CPU work buffers)."""

import torch

from kvmem.stats import LayerStats
from kvmem.stats.store import release_buffers


def _batch(start, d=16, n=40):
    return (torch.randn(n, d), torch.arange(start, start + n), torch.zeros(n, dtype=torch.long),
            torch.arange(n) % 8)


def test_update_after_inference_mode_update():
    release_buffers()
    first = LayerStats(16, k=3)
    with torch.inference_mode():  # buffers are first allocated here ...
        first.update(*_batch(0))
    second = LayerStats(16, k=3)
    coef, idx, doc, pos = _batch(0)
    second.update(coef, idx, doc, pos)  # ... and reused here
    with torch.inference_mode():
        coef2 = torch.randn(40, 16)  # an inference tensor handed over outside inference mode
    second.update(coef2, idx + 40, doc, pos)
    assert second.n == 80 and torch.equal(second.count_pos, (coef > 0).sum(0) + (coef2 > 0).sum(0))
