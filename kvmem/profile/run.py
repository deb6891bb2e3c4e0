"""``open_run``: the one typed reader of a run folder (its contract: kvmem.profile.schema), and the writers
of its statistics.

    run = kvmem.open_run("runs/NAME")      # checks format, files, manifest fields, table columns
    run.stats[layer] / run.layer_stats(layer)   LayerStats (CPU), loaded once on first use
    run.tokens     TokenStore (global indices: ``offset``, ``doc_of``, ``doc_start`` always there)
    run.layout     RowLayout: the model rows (BOS, document-aligned rows, position 0 skipped), ``batch``/``prefix``
    run.vocab      list[str];  run.neurons, run.layers: DataFrames with the schema's columns
    run.moe, run.moe_layers, run.routing   mixture-of-experts layers and their routing table
    slots(stats, kind)   a LayerStats' example store by name (schema.STORES)

The report, the analyses and the CLI read runs only through this module: nothing else opens the
run's files. Every file is written to a temporary name and renamed into place (kvmem.atomic).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
from safetensors.torch import load_file, save_file

from kvmem.atomic import write_file, write_json, write_parquet  # noqa: F401  (the run's writers)
from kvmem.errors import KvmemError
from kvmem.neurons import NeuronId, parse_neuron
from kvmem.profile import schema
from kvmem.profile.tokens import RowLayout, TokenStore

if TYPE_CHECKING:
    from kvmem.stats import LayerStats, Slots

MANIFEST = schema.MANIFEST_FILE
PARTIAL_KIND = "run"

# the example stores of a LayerStats by name: an explicit map, no attribute lookup by string
_STORES = {"top": lambda s: s.top, "bottom": lambda s: s.bottom, "top_docs": lambda s: s.top_docs,
           "sample": lambda s: s.sample}
STORES = tuple(schema.STORES)


def slots(stats: LayerStats, kind: str) -> Slots:
    """The example store ``kind`` (top, bottom, top_docs, sample: schema.STORES) of one layer's statistics:
    Slots(value [d_mlp, k] float32 NaN-empty, index [d_mlp, k] int64 -1-empty, doc for top_docs)."""
    if kind not in _STORES:
        raise KvmemError(f"unknown example kind {kind!r}; choose from {', '.join(STORES)}")
    return _STORES[kind](stats)


def _first_line(e: BaseException) -> str:
    """An exception in a few words, for a one-line error."""
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def save_stats(path: Path, stats: dict) -> None:
    """{layer: LayerStats} -> one safetensors file (tensor names: schema.stats_key)."""
    tensors = {schema.stats_key(layer, k): v.detach().cpu().contiguous() for layer, s in stats.items()
               for k, v in s.state_dict().items()}
    write_file(path, lambda p: save_file(tensors, str(p)))


def load_stats(path: Path, device="cpu") -> dict:
    """The {layer: LayerStats} of a file written by ``save_stats``; a one-line KvmemError ending in "profile
    the run again" if it cannot be read."""
    from kvmem.stats import LayerStats

    try:
        flat = load_file(str(path))
    except Exception as e:  # missing or corrupt file: safetensors raises its own error types
        raise KvmemError(f"{path}: cannot read the statistics ({_first_line(e)}); profile the run again") from None
    by_layer: dict[int, dict] = {}
    for name, t in flat.items():
        try:
            layer, key = schema.split_stats_key(name)
        except KvmemError as e:
            raise KvmemError(f"{path}: {e}; profile the run again") from None
        by_layer.setdefault(layer, {})[key] = t
    try:
        return {layer: LayerStats.from_state_dict(d, device=device) for layer, d in sorted(by_layer.items())}
    except (KeyError, ValueError, KvmemError) as e:  # a state written by another version of kvmem.stats
        raise KvmemError(f"{path}: statistics in a format this kvmem cannot read ({e}); "
                         "profile the run again") from None


def profile_again(path: Path, manifest: dict | None = None) -> str:
    """The sentence that ends every "this run cannot be read" error."""
    model = manifest.get("model") if isinstance(manifest, dict) else None
    spec = model.get("model", "MODEL") if isinstance(model, dict) else "MODEL"
    return f"profile it again: kvmem profile {spec} --out {path} --force"


@dataclass
class Run:
    """A finished profile run (see the module docstring; open it with ``open_run``). Tables and tensors
    load lazily, once; tables are checked against kvmem.profile.schema when read."""

    path: Path
    manifest: dict
    _cache: dict = field(default_factory=dict, repr=False)

    def _lazy(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    # --- the manifest ---------------------------------------------------------------------------
    @property
    def format(self) -> int:
        """The run's format (schema.RUN_FORMAT when written by this kvmem; 1 for runs without the field)."""
        return int(self.manifest.get("format", 1))

    @property
    def model_spec(self) -> str:
        """The model spec the run was profiled with (kvmem.load)."""
        return str(self.manifest["model"]["model"])

    @property
    def gated(self) -> bool:
        """Whether the model's FFN is gated (then the statistics hold sign quadrants)."""
        return bool(self.manifest["model"]["gated"])

    @property
    def d_mlp(self) -> int:
        return int(self.manifest["model"]["d_mlp"])

    @property
    def n_layers(self) -> int:
        return int(self.manifest["model"]["n_layers"])

    @property
    def seq_len(self) -> int:
        """Tokens per model input row, the BOS included (the rows themselves: ``layout``)."""
        return int(self.manifest["settings"]["seq_len"])

    @property
    def layout(self) -> RowLayout:
        """How the token store was cut into model rows (kvmem.profile.tokens.RowLayout): the manifest's
        "layout" (format >= 3); runs of formats 1-2 cut the stream into seq_len rows across documents, no
        BOS, position 0 kept."""
        def build():
            if self.format >= 3:
                return RowLayout.from_settings(self.tokens, self.manifest["layout"])
            return RowLayout.build(self.tokens, self.seq_len, None, doc_rows=False, skip_first=False)
        return self._lazy("layout", build)

    @property
    def profiled_layers(self) -> list[int]:
        return [int(x) for x in self.manifest["settings"]["layers"]]

    @property
    def moe(self) -> bool:
        """Whether mixture-of-experts layers were profiled (the manifest's "moe"; then ``routing`` exists and
        the neuron table has expert columns)."""
        return isinstance(self.manifest.get("moe"), dict)

    @property
    def quadrants(self) -> bool:
        """Whether the run holds sign-quadrant statistics (their columns): a gated model with a profiled dense
        layer (the experts of MoE layers keep none; in a run with both, their rows hold -1 there)."""
        return self.gated and any(layer not in self.moe_layers for layer in self.profiled_layers)

    @property
    def moe_layers(self) -> list[int]:
        """The profiled MoE layers (empty for a dense run)."""
        return [int(x) for x in self.manifest["moe"]["layers"]] if self.moe else []

    # --- the files ------------------------------------------------------------------------------
    @property
    def analysis_dir(self) -> Path:
        """Where ``kvmem analyze`` writes (schema.ANALYSIS_DIR; it may not exist yet)."""
        return self.path / schema.ANALYSIS_DIR

    def _table(self, table: schema.Table) -> pd.DataFrame:
        path = self.path / table.file
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError) as e:  # a missing, truncated or foreign file
            raise KvmemError(f"{path}: unreadable ({_first_line(e)}); "
                             f"{profile_again(self.path, self.manifest)}") from None
        table.check(df.columns, path, self.quadrants, profile_again(self.path, self.manifest), moe=self.moe)
        return df

    @property
    def neurons(self) -> pd.DataFrame:
        """One row per (layer, neuron): the columns of schema.NEURONS."""
        return self._lazy("neurons", lambda: self._table(schema.NEURONS))

    @property
    def layers(self) -> pd.DataFrame:
        """One row per profiled layer: the columns of schema.LAYERS."""
        return self._lazy("layers", lambda: self._table(schema.LAYERS))

    @property
    def routing(self) -> pd.DataFrame:
        """One row per (MoE layer, routed expert): the columns of schema.ROUTING (load with its Wilson
        interval, routing weight, co-selection); an empty table with those columns for a dense run."""
        if not self.moe:
            return pd.DataFrame({c: [] for c in schema.ROUTING.known})
        return self._lazy("routing", lambda: self._table(schema.ROUTING))

    @property
    def tokens(self) -> TokenStore:
        return self._lazy("tokens", self._load_tokens)

    def _load_tokens(self) -> TokenStore:
        path = self.path / schema.TOKENS_FILE
        try:
            return TokenStore.load(path)
        except Exception as e:  # safetensors raises its own error types; a missing tensor is a KeyError
            raise KvmemError(f"{path}: cannot read the token store ({_first_line(e)}); "
                             f"{profile_again(self.path, self.manifest)}") from None

    @property
    def vocab(self) -> list[str]:
        """Token string of each id."""
        return self._lazy("vocab", lambda: self._table(schema.VOCAB)["token"].tolist())

    @property
    def stats(self) -> dict[int, LayerStats]:
        """{layer: LayerStats} on the CPU, one per profiled layer."""
        return self._lazy("stats", self._load_stats)

    def _load_stats(self) -> dict:
        try:
            stats = load_stats(self.path / schema.STATS_FILE)
        except KvmemError as e:  # e.g. a format-1 run whose statistics this kvmem.stats no longer reads
            raise KvmemError(f"{e}: kvmem profile {self.model_spec} --out {self.path} --force") from None
        for layer, s in stats.items():  # every statistic kvmem.stats.registry keeps for such a layer
            missing = s.missing()
            if missing:
                raise KvmemError(f"{self.path / schema.STATS_FILE}: layer {layer} has no {missing[0]!r} statistic "
                                 f"(written by another kvmem); {profile_again(self.path, self.manifest)}")
        if sorted(stats) != sorted(self.profiled_layers):
            raise KvmemError(f"{self.path / schema.STATS_FILE}: statistics of layers {sorted(stats)}, but the "
                             f"manifest says {self.profiled_layers} were profiled; "
                             f"{profile_again(self.path, self.manifest)}")
        return stats

    @property
    def explanations(self) -> pd.DataFrame:
        """Descriptions and their scores (kvmem.explain.store.COLUMNS; written by kvmem explain / score):
        one row per (neuron, side, sign, explainer); an empty table with those columns if none were written.
        Read fresh each time (kvmem explain may have added rows)."""
        from kvmem.explain import store

        return store.read(self)

    def layer_stats(self, layer: int) -> LayerStats:
        """The statistics of one profiled layer."""
        if layer not in self.profiled_layers:
            raise KvmemError(f"layer {layer} was not profiled in this run (layers: {self.profiled_layers})")
        return self.stats[layer]

    def slots(self, layer: int, kind: str) -> Slots:
        """The example store ``kind`` of ``layer`` (see ``slots``)."""
        return slots(self.layer_stats(layer), kind)

    def has_context(self, layer: int) -> bool:
        """Whether the run kept the context windows of the layer's shown examples (kvmem.stats.context),
        so that the report shades them without re-running the model (off with --no-context, and in runs
        of kvmem before 0.2)."""
        return self.layer_stats(layer).context is not None

    # --- checks and helpers ---------------------------------------------------------------------
    def check_model(self, model, what: str = "the model") -> None:
        """Raise a one-line KvmemError unless ``model`` has the weights this run profiled."""
        from kvmem.models.fingerprint import SCHEME

        m = self.manifest["model"]
        if m.get("fingerprint_scheme") != SCHEME:
            raise KvmemError(f"{self.path} was profiled by an older kvmem whose model fingerprint cannot be checked "
                             f"against the weights; {profile_again(self.path, self.manifest)}")
        if model.fingerprint() != m["fingerprint"]:
            raise KvmemError(f"{what} ({model.spec}) is not the model {self.path} was profiled with "
                             f"({m.get('model')}): their weights differ")

    def neuron(self, text: str) -> tuple[int, int]:
        """Parse and check 'L.N' (or an expert neuron 'L.eE.N' / 'L.sS.N' of an MoE layer) against this run:
        (layer, the neuron's flat index in the layer)."""
        nid = NeuronId.parse(text)
        if nid.dense and not self.moe:
            layer, neuron = parse_neuron(text, self.n_layers, self.d_mlp)
        else:
            layer = nid.check(self.n_layers).layer
        if layer not in self.profiled_layers:
            raise KvmemError(f"layer {layer} was not profiled in this run (layers: {self.profiled_layers})")
        if nid.dense and not self.moe:
            return layer, neuron
        df = self.neurons
        rows = df[df["layer"] == layer]
        if nid.dense != (layer not in self.moe_layers):
            what = "an expert neuron, but layer {} is dense" if not nid.dense else "layer {} is an MoE layer: name the expert"
            raise KvmemError(f"neuron {nid}: {what.format(layer)} (LAYER.eEXPERT.NEURON / LAYER.sSHARED.NEURON)")
        hit = rows[rows["id"] == str(nid)]
        if hit.empty:
            raise KvmemError(f"neuron {nid}: no such neuron in layer {layer} of this run")
        return layer, int(hit["neuron"].iloc[0])

    def neuron_label(self, layer: int, neuron: int) -> str:
        """The id of flat neuron ``neuron`` of ``layer`` as NeuronId prints it (L.N; MoE layers L.eE.N / L.sS.N)."""
        if layer not in self.moe_layers:
            return f"{int(layer)}.{int(neuron)}"
        df = self.neurons
        return str(df[(df["layer"] == layer) & (df["neuron"] == neuron)]["id"].iloc[0])

    def examples(self, layer: int, neuron: int, kind: str = "top", before: int = 12, after: int = 4) -> pd.DataFrame:
        """A neuron's stored examples with their context: kind is top, bottom, top_docs or sample."""
        from kvmem.profile.examples import examples

        return examples(self, layer, neuron, kind, before=before, after=after)


def open_run(path: str | os.PathLike) -> Run:
    """Open a finished run folder written by ``kvmem profile`` or ``kvmem merge``, checked against its contract
    (kvmem.profile.schema): format version, files, manifest fields and table columns. Anything else is a
    one-line KvmemError that says how to profile the run again."""
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
    if not isinstance(manifest, dict):
        raise KvmemError(f"{path / MANIFEST}: not a kvmem run manifest; {profile_again(path)}")
    fmt = manifest.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt not in schema.READABLE_FORMATS:
        raise KvmemError(f"{path} is a run of format {fmt!r}, which this kvmem does not read (formats "
                         f"{', '.join(map(str, schema.READABLE_FORMATS))}); {profile_again(path, manifest)}")
    missing = schema.missing_manifest_fields(manifest)
    if not missing and fmt >= 3 and not isinstance(manifest.get("layout"), dict):
        missing = ["layout"]
    if missing:
        raise KvmemError(f"{path / MANIFEST}: no field {missing[0]!r}; {profile_again(path, manifest)}")
    moe = isinstance(manifest.get("moe"), dict)
    for name in list(schema.FILES) + (list(schema.MOE_FILES) if moe else []):
        if not (path / name).is_file():
            raise KvmemError(f"{path}: {name} is missing; {profile_again(path, manifest)}")
    run = Run(path, manifest)
    gated = run.quadrants
    tables = (schema.NEURONS, schema.LAYERS, schema.VOCAB) + ((schema.ROUTING,) if moe else ())
    for table in tables:  # column names only: the files' footers
        table.check(_columns(path / table.file, path, manifest), path / table.file, gated,
                    profile_again(path, manifest), moe=moe)
    return run


def _columns(path: Path, run_path: Path, manifest: dict) -> list[str]:
    """The column names of a parquet file, read from its footer (no data)."""
    import pyarrow.parquet as pq

    try:
        return list(pq.read_schema(path).names)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise KvmemError(f"{path}: unreadable ({_first_line(e)}); "
                         f"{profile_again(run_path, manifest)}") from None


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a finished kvmem run (its manifest)."""
    return (Path(path) / MANIFEST).is_file()
