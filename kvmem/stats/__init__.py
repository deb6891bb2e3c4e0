"""Streaming, mergeable per-layer neuron statistics (top-k tokens and documents, random sample,
moments, histogram, gate/up quadrants, L0, context windows of the shown examples) for ``kvmem profile``."""

from kvmem.stats.context import ContextWindows
from kvmem.stats.hist import HIST_EDGES, N_BINS, ZERO_BIN, bins_of
from kvmem.stats.keys import sample_priority
from kvmem.stats.layer import LayerStats, Quadrants, Slots
from kvmem.stats.store import release_buffers

__all__ = ["ContextWindows", "HIST_EDGES", "N_BINS", "ZERO_BIN", "LayerStats", "Quadrants", "Slots", "bins_of", "release_buffers", "sample_priority"]
