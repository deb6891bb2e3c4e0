"""A run folder on disk, and ``open_run`` to read it back as DataFrames.

runs/NAME/
  manifest.json        model spec, fingerprint and shape; corpus and token count; settings; kvmem
                       version; time taken. Written last: its presence means the run is complete.
  tokens.safetensors   the token store (ids, doc_offsets), see kvmem.profile.tokens
  vocab.parquet        id -> token string, so examples can be shown without the model
  stats.safetensors    every layer's LayerStats state, names prefixed "L{layer}."
  neurons.parquet      one row per neuron: layer, neuron, id, firing rate, mean, max, top example, ...
  layers.parquet       one row per layer: firing rate, dead and dense neurons, L0, sign quadrants
  checkpoint/          only while a run is in progress (state + progress.json), for --resume
Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file, save_file

from kvmem.atomic import write_file, write_json, write_parquet  # noqa: F401  (the run's writers)
from kvmem.errors import KvmemError
from kvmem.neurons import parse_neuron
from kvmem.profile.tokens import TokenStore

MANIFEST = "manifest.json"
PARTIAL_KIND = "run"


def save_stats(path: Path, stats: dict) -> None:
    """{layer: LayerStats} -> one safetensors file."""
    tensors = {f"L{layer}.{k}": v.detach().cpu().contiguous() for layer, s in stats.items()
               for k, v in s.state_dict().items()}
    write_file(path, lambda p: save_file(tensors, str(p)))


def load_stats(path: Path, device="cpu") -> dict:
    from kvmem.stats import LayerStats

    try:
        flat = load_file(str(path))
    except Exception as e:  # missing or corrupt file: safetensors raises its own error types
        raise KvmemError(f"{path}: cannot read the statistics ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    by_layer: dict[int, dict] = {}
    for name, t in flat.items():
        layer, key = name.split(".", 1)
        by_layer.setdefault(int(layer[1:]), {})[key] = t
    try:
        return {layer: LayerStats.from_state_dict(d, device=device) for layer, d in sorted(by_layer.items())}
    except (KeyError, ValueError) as e:  # a state written by another version of kvmem.stats
        raise KvmemError(f"{path}: statistics in a format this kvmem cannot read ({e}); profile the run again") from None


@dataclass
class Run:
    """A finished profile run. Tables are pandas DataFrames; tensors load lazily."""

    path: Path
    manifest: dict
    _cache: dict = field(default_factory=dict, repr=False)

    def _lazy(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    @property
    def neurons(self) -> pd.DataFrame:
        return self._lazy("neurons", lambda: pd.read_parquet(self.path / "neurons.parquet"))

    @property
    def layers(self) -> pd.DataFrame:
        return self._lazy("layers", lambda: pd.read_parquet(self.path / "layers.parquet"))

    @property
    def tokens(self) -> TokenStore:
        return self._lazy("tokens", lambda: TokenStore.load(self.path / "tokens.safetensors"))

    @property
    def vocab(self) -> list[str]:
        return self._lazy("vocab", lambda: pd.read_parquet(self.path / "vocab.parquet")["token"].tolist())

    @property
    def stats(self) -> dict:
        """{layer: LayerStats} on the CPU."""
        return self._lazy("stats", lambda: load_stats(self.path / "stats.safetensors"))

    @property
    def profiled_layers(self) -> list[int]:
        return list(self.manifest["settings"]["layers"])

    def check_model(self, model, what: str = "the model") -> None:
        """Raise a one-line KvmemError unless ``model`` has the weights this run profiled."""
        from kvmem.models.fingerprint import SCHEME

        m = self.manifest["model"]
        if m.get("fingerprint_scheme") != SCHEME:
            raise KvmemError(f"{self.path} was profiled by an older kvmem whose model fingerprint cannot be checked "
                             f"against the weights; profile it again: kvmem profile {m.get('model', 'MODEL')} "
                             f"--out {self.path} --force")
        if model.fingerprint() != m["fingerprint"]:
            raise KvmemError(f"{what} ({model.spec}) is not the model {self.path} was profiled with "
                             f"({m.get('model')}): their weights differ")

    def neuron(self, text: str) -> tuple[int, int]:
        """Parse and check 'L.N' against this run."""
        m = self.manifest["model"]
        layer, neuron = parse_neuron(text, m["n_layers"], m["d_mlp"])
        if layer not in self.profiled_layers:
            raise KvmemError(f"layer {layer} was not profiled in this run (layers: {self.profiled_layers})")
        return layer, neuron

    def examples(self, layer: int, neuron: int, kind: str = "top", before: int = 12, after: int = 4) -> pd.DataFrame:
        """A neuron's stored examples with their context: kind is top, bottom, top_docs or sample."""
        from kvmem.profile.examples import examples

        return examples(self, layer, neuron, kind, before=before, after=after)


def open_run(path: str | os.PathLike) -> Run:
    """Open a finished run folder written by ``kvmem profile`` or ``kvmem merge``."""
    from kvmem.atomic import is_own_partial, staging_of

    path = Path(path)
    if not (path / MANIFEST).is_file():
        hint = (" (unfinished: run the same kvmem profile command again to continue it)"
                if is_own_partial(staging_of(path), PARTIAL_KIND) else "")
        raise KvmemError(f"{path}: not a kvmem run (no {MANIFEST}){hint}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KvmemError(f"{path / MANIFEST}: unreadable ({e})") from None
    return Run(path, manifest)


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a finished kvmem run (its manifest)."""
    return (Path(path) / MANIFEST).is_file()
