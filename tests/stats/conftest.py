"""Every statistics test runs twice on CPU: on the fused one-pass kernel (kvmem.stats.fused, what
CPU runs take) and on the torch path (what a GPU runs, exercised here by the same code on CPU)."""

import pytest

from kvmem.stats import fused, mass


@pytest.fixture(autouse=True, params=["fused", "torch"])
def stats_path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(fused, "available", False)
        monkeypatch.setattr(mass, "FORCE_TORCH", True)
    return request.param
