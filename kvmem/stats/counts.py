"""Counts of positive coefficients (m > 0): per neuron and per token.

State (int64): ``pos`` [d] tokens with m > 0 per neuron; ``l0_hist`` [d + 1] tokens by their L0 (number of
neurons with m > 0); ``l0_pos_sum`` [max_pos] sum of L0 over tokens at each row position, ``l0_pos_count``
[max_pos] tokens at each position.

m > 0 is the sparsity of ReLU/GELU FFNs; for gated FFNs (SwiGLU, GeGLU) m is sign-symmetric and this says
little (about half of the neurons): kvmem.stats.mass and the histogram's magnitude shares are the figures
for those. Kept for every family so that models can be compared side by side.
"""

from __future__ import annotations

import torch

from kvmem.stats.base import Batch, Counters
from kvmem.stats.store import bincount_fixed


class PositiveCounts(Counters):
    FIELDS = {
        "pos": (lambda s: (s.d_mlp,), torch.int64),
        "l0_hist": (lambda s: (s.d_mlp + 1,), torch.int64),
        "l0_pos_sum": (lambda s: (s.max_pos,), torch.int64),
        "l0_pos_count": (lambda s: (s.max_pos,), torch.int64),
    }

    def update(self, batch: Batch) -> None:
        l0, count = batch.positives
        self.add(l0, count, batch.pos)

    def update_dense(self, batch: Batch) -> None:
        """update without host synchronisation (index_add_ for the bincounts)."""
        l0, count = batch.positives
        self.add(l0, count, batch.pos, fixed=True)

    def add(self, l0: torch.Tensor, count: torch.Tensor, pos: torch.Tensor, fixed: bool = False) -> None:
        """Add a batch's L0 per token l0 [N], positives per neuron count [d], row positions pos [N]."""
        if fixed:  # out of place, so that a failed sync-free update leaves the state as it was (LayerStats)
            self.pos = self.pos + count
            self.l0_hist = self.l0_hist + bincount_fixed(l0, self.spec.d_mlp + 1)
            self.l0_pos_sum = self.l0_pos_sum.index_add(0, pos, l0)
            self.l0_pos_count = self.l0_pos_count + bincount_fixed(pos, self.spec.max_pos)
            return
        self.pos += count
        self.l0_hist += torch.bincount(l0, minlength=self.spec.d_mlp + 1)
        self.l0_pos_sum.index_add_(0, pos, l0)
        self.l0_pos_count += torch.bincount(pos, minlength=self.spec.max_pos)
