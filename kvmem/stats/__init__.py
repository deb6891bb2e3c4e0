"""Streaming, mergeable per-layer neuron statistics for ``kvmem profile``, as components (kvmem.stats.base;
the list in kvmem.stats.registry): top-k tokens and documents, random sample, moments, histogram, gate/up
quadrants, m > 0 counts, the written mass's L0, and context windows of the shown examples."""

from kvmem.stats.context import ContextWindows
from kvmem.stats.hist import HIST_EDGES, N_BINS, ZERO_BIN, bins_of
from kvmem.stats.keys import sample_priority
from kvmem.stats.base import Batch, LayerSpec, Stat
from kvmem.stats.layer import LayerStats, Quadrants, Slots
from kvmem.stats.store import release_buffers

__all__ = ["Batch", "LayerSpec", "Stat", "ContextWindows", "HIST_EDGES", "N_BINS", "ZERO_BIN", "LayerStats", "Quadrants", "Slots", "bins_of", "release_buffers", "sample_priority"]
