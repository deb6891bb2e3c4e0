"""The run folder's contract (kvmem.profile.schema) and its one reader (kvmem.open_run): typed read-outs, the
schema against freshly written runs (both ways), one-line refusals of runs that break it (library and CLI),
and no other module reading the run's files or probing its objects."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import fields
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

import kvmem
from kvmem.errors import KvmemError
from kvmem.profile import schema
from kvmem.profile.run import STORES, Run, slots
from kvmem.profile.runner import ProfileConfig
from kvmem.profile.tokens import TokenStore
from kvmem.stats import LayerStats, Slots
from tests.cli.test_core_cli import assert_one_line_error
from tests.cli.test_core_cli import run as cli

KVMEM = Path(kvmem.__file__).parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models, corpus):
    """family -> a finished run of the tiny model (gpt2: not gated; llama: gated)."""
    root = tmp_path_factory.mktemp("contract")
    cfg = ProfileConfig(corpus=str(corpus), seq_len=16, top_k=4, batch_size=4, checkpoint_every=1e9)
    return {family: kvmem.profile(cfg, root / family, model=tiny_models[family]) for family in ("gpt2", "llama")}


# --- the typed reader ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_open_run_returns_typed_objects(runs, family):
    run = kvmem.open_run(runs[family].path)
    assert isinstance(run, Run)
    assert run.format == schema.RUN_FORMAT == run.manifest["format"]
    assert run.gated is (family == "llama") and run.model_spec == run.manifest["model"]["model"]
    assert run.seq_len == 16 and run.d_mlp == 48 and run.n_layers == 3 and run.profiled_layers == [0, 1, 2]
    assert isinstance(run.tokens, TokenStore) and run.tokens.offset == 0
    assert isinstance(run.vocab, list) and all(isinstance(t, str) for t in run.vocab[:20])
    assert isinstance(run.neurons, pd.DataFrame) and len(run.neurons) == 3 * 48
    assert isinstance(run.layers, pd.DataFrame) and run.layers.layer.tolist() == [0, 1, 2]
    assert sorted(run.stats) == run.profiled_layers
    for layer in run.profiled_layers:
        s = run.layer_stats(layer)
        assert isinstance(s, LayerStats) and s is run.stats[layer]
        assert run.has_context(layer)
        assert (s.quadrants is not None) is run.gated
        for kind in STORES:
            got = slots(s, kind)
            assert isinstance(got, Slots) and got.value.shape == got.index.shape == (48, 4)
            assert (run.slots(layer, kind).index == got.index).all()
    assert set(STORES) == set(schema.STORES) == {"top", "bottom", "top_docs", "sample"}
    with pytest.raises(KvmemError, match="not profiled"):
        run.layer_stats(7)
    with pytest.raises(KvmemError, match="unknown example kind"):
        slots(run.layer_stats(0), "best")
    with pytest.raises(KvmemError, match="unknown example kind"):
        run.examples(0, 1, "best")
    assert run.analysis_dir == run.path / schema.ANALYSIS_DIR


def test_a_run_without_the_format_field_is_read_as_format_1(tmp_path, runs):
    path = _copy(runs["gpt2"], tmp_path)
    _edit_manifest(path, lambda m: m.pop("format"))
    run = kvmem.open_run(path)
    assert run.format == 1 and 1 in schema.READABLE_FORMATS
    assert sorted(run.stats) == [0, 1, 2]


# --- the schema against what the writers write, both ways ----------------------------------------
def _arrow_dtype(t: pa.DataType) -> str:
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list[{_arrow_dtype(t.value_type)}]"
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    return {pa.int64(): "int64", pa.float32(): "float32", pa.float64(): "float64", pa.int32(): "int32",
            pa.bool_(): "bool"}.get(t, str(t))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_schema_lists_exactly_the_columns_written(runs, family):
    run = runs[family]
    gated = run.gated
    for table in (schema.NEURONS, schema.LAYERS, schema.VOCAB):
        written = {f.name: _arrow_dtype(f.type) for f in pq.read_schema(run.path / table.file)}
        missing = [c for c in table.required(gated) if c not in written]
        undocumented = [c for c in written if c not in table.known]
        assert not missing and not undocumented, (table.file, missing, undocumented)
        if not gated:  # columns of gated FFNs only appear for them
            assert not set(table.gated) & set(written), table.file
        wrong = {c: (table.known[c][0], t) for c, t in written.items() if table.known[c][0] != t}
        assert not wrong, (table.file, wrong)
        for name, (dtype, description) in table.known.items():
            assert dtype and len(description) > 5 and "\n" not in description, name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_schema_lists_exactly_the_files_tensors_and_manifest_fields(runs, family):
    run = runs[family]
    assert {p.name for p in run.path.iterdir()} == set(schema.FILES)  # no analysis/ yet, no checkpoint/
    tokens = load_file(str(run.path / schema.TOKENS_FILE))
    assert set(schema.TOKENS) <= set(tokens) <= set(schema.TOKENS) | set(schema.TOKENS_OPTIONAL)
    assert {name: str(t.dtype).removeprefix("torch.") for name, t in tokens.items()} == \
        {name: dtype for name, (dtype, _) in {**schema.TOKENS, **schema.TOKENS_OPTIONAL}.items() if name in tokens}
    names = load_file(str(run.path / schema.STATS_FILE)).keys()
    assert {schema.split_stats_key(n)[0] for n in names} == set(run.profiled_layers)
    assert {schema.stats_key(*schema.split_stats_key(n)) for n in names} == set(names)
    for layer, s in run.stats.items():  # L{layer}.{name}: name is the LayerStats state's own
        assert {n for n in names if n.startswith(f"L{layer}.")} == {schema.stats_key(layer, k) for k in s.state_dict()}
    # the manifest: every required field there, every field there documented
    manifest = json.loads((run.path / schema.MANIFEST_FILE).read_text())
    assert schema.missing_manifest_fields(manifest) == []
    documented = set(schema.MANIFEST) | set(schema.MANIFEST_OPTIONAL)
    config_fields = {f.name for f in fields(ProfileConfig)}
    for name in _dotted(manifest):
        section, _, key = name.partition(".")
        assert name in documented or (section == "settings" and key in config_fields), name
    assert config_fields <= set(manifest["settings"])  # settings.*: every ProfileConfig field


def _dotted(manifest: dict) -> list[str]:
    """Top-level fields, and 'section.key' for the fields of each section (one level)."""
    out = []
    for key, value in manifest.items():
        if isinstance(value, dict):
            out += [f"{key}.{k}" for k in value]
        else:
            out.append(key)
    return out


def test_stats_keys():
    assert schema.stats_key(12, "top.value") == "L12.top.value"
    assert schema.split_stats_key("L12.top.value") == (12, "top.value")
    for bad in ("top.value", "Lx.top", "L3", "12.top"):
        with pytest.raises(KvmemError):
            schema.split_stats_key(bad)


# --- runs that break the contract: one line, from the library and from the CLI -------------------
def _copy(run: Run, tmp_path: Path) -> Path:
    out = tmp_path / "broken"
    shutil.copytree(run.path, out)
    return out


def _edit_manifest(path: Path, fn) -> None:
    m = json.loads((path / schema.MANIFEST_FILE).read_text())
    fn(m)
    (path / schema.MANIFEST_FILE).write_text(json.dumps(m))


def _drop_column(path: Path, file: str, column: str) -> None:
    df = pd.read_parquet(path / file)
    df.drop(columns=[column]).to_parquet(path / file, index=False)


BROKEN = {
    "format 99": ("gpt2", lambda p: _edit_manifest(p, lambda m: m.update(format=99)), "format 99"),
    "format as text": ("gpt2", lambda p: _edit_manifest(p, lambda m: m.update(format="2")), "format '2'"),
    "manifest field": ("gpt2", lambda p: _edit_manifest(p, lambda m: m["model"].pop("d_mlp")), "model.d_mlp"),
    "stats file": ("gpt2", lambda p: (p / schema.STATS_FILE).unlink(), "stats.safetensors is missing"),
    "tokens file": ("gpt2", lambda p: (p / schema.TOKENS_FILE).unlink(), "tokens.safetensors is missing"),
    "neurons file": ("gpt2", lambda p: (p / schema.NEURONS_FILE).unlink(), "neurons.parquet is missing"),
    "neuron column": ("gpt2", lambda p: _drop_column(p, schema.NEURONS_FILE, "firing_rate"),
                      "neurons.parquet: no column 'firing_rate'"),
    "layer column": ("gpt2", lambda p: _drop_column(p, schema.LAYERS_FILE, "l0_mean"),
                     "layers.parquet: no column 'l0_mean'"),
    "gated column": ("llama", lambda p: _drop_column(p, schema.NEURONS_FILE, "q_pp"),
                     "neurons.parquet: no column 'q_pp'"),
    "vocab column": ("gpt2", lambda p: _drop_column(p, schema.VOCAB_FILE, "token"), "vocab.parquet: no column 'token'"),
    "not parquet": ("gpt2", lambda p: (p / schema.LAYERS_FILE).write_bytes(b"not parquet"),
                    "layers.parquet: unreadable"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_run_that_breaks_the_contract_is_refused_in_one_line(capsys, tmp_path, runs, case):
    family, breaks, needle = BROKEN[case]
    path = _copy(runs[family], tmp_path)
    breaks(path)
    with pytest.raises(KvmemError) as e:
        kvmem.open_run(path)
    message = str(e.value)
    assert needle in message and "\n" not in message, message
    assert message.endswith(f"profile it again: kvmem profile {runs[family].model_spec} --out {path} --force")
    for argv in (["report", str(path), "--out", str(tmp_path / "rep")], ["analyze", str(path), "--device", "cpu"]):
        code, _, err = cli(capsys, *argv)
        assert_one_line_error(code, err)
        assert needle in err, (argv[0], err)
    assert not (tmp_path / "rep").exists() and not (path / schema.ANALYSIS_DIR).exists()


def test_a_gated_column_is_not_required_of_a_plain_model(runs):
    assert "q_pp" in schema.NEURONS.required(gated=True) and "q_pp" not in schema.NEURONS.required(gated=False)
    schema.NEURONS.check(list(schema.NEURON_COLUMNS) + ["a newer column"], "x", gated=False)  # extra: fine
    with pytest.raises(KvmemError, match="x: no column 'q_pp'"):
        schema.NEURONS.check(list(schema.NEURON_COLUMNS), "x", gated=True)


# --- nobody else reads the files or probes the objects --------------------------------------------
READERS = {"profile/run.py", "profile/schema.py"}
# the writer of a run (finalize) joins the files' names to the folder it writes; it reads none of them back
# (it opens the run with open_run), except the torchrun merge, which rewrites the merged manifest in place
WRITERS = {"profile/job.py"}
# a path to one of the run's files: folder / "neurons.parquet", folder / MANIFEST (prose that names a file,
# like a help text, is not a path)
RUN_PATH = re.compile(r"/\s*(['\"](stats\.safetensors|neurons\.parquet|layers\.parquet|manifest\.json)['\"]"
                      r"|(\w+\.)?MANIFEST\b)")
# folders with a manifest.json of their own, or that only look whether one is there
OTHER_MANIFESTS = {"vocab.py": "the value-projection cache's own manifest",
                   "atomic.py": "recognises a finished run it must not replace (is_file only)"}


def _sources():
    for path in sorted(KVMEM.rglob("*.py")):
        yield path.relative_to(KVMEM).as_posix(), path.read_text()


def test_only_the_reader_opens_the_run_files():
    for name, text in _sources():
        if name in READERS:
            continue
        for line in text.splitlines():
            found = RUN_PATH.search(line)
            if found is None:
                continue
            manifest = "manifest" in found.group(0).lower()
            assert name in WRITERS or (manifest and name in OTHER_MANIFESTS), \
                f"{name} opens a run file ({line.strip()}): read it through kvmem.open_run"
    assert RUN_PATH.search('path / "neurons.parquet"') and RUN_PATH.search("tmp / runfiles.MANIFEST")
    assert not RUN_PATH.search("m > 0 is in layers.parquet")


def test_no_probes_of_the_run_objects():
    probes = re.compile(r"hasattr\(|getattr\((store|stats|run|s|slots)\b|\.store\(|def store_of\b")
    for name, text in _sources():
        if name.startswith(("report/", "analysis/")) or name in ("profile/examples.py", "cli/analyze.py"):
            hits = [line.strip() for line in text.splitlines() if probes.search(line)]
            assert not hits, (name, hits)
    defined = [name for name, text in _sources() if re.search(r"^def slots\(", text, re.M)]
    assert defined == ["profile/run.py"]


def test_a_format_1_run_whose_statistics_cannot_be_read_is_refused_with_how_to_profile_it_again(
        capsys, tmp_path, runs):
    path = _copy(runs["gpt2"], tmp_path)
    _edit_manifest(path, lambda m: m.pop("format"))
    (path / schema.STATS_FILE).write_bytes(b"written by another kvmem")
    run = kvmem.open_run(path)  # format 1 is read as long as its statistics are
    with pytest.raises(KvmemError) as e:
        run.stats
    message = str(e.value)
    assert "\n" not in message and "cannot read the statistics" in message
    assert message.endswith(f"kvmem profile {run.model_spec} --out {path} --force")
    code, _, err = cli(capsys, "report", str(path), "--out", str(tmp_path / "rep"))
    assert_one_line_error(code, err)
    assert "cannot read the statistics" in err and not (tmp_path / "rep").exists()


def test_a_run_whose_layer_lacks_a_statistic_is_refused(capsys, tmp_path, runs):
    from safetensors.torch import save_file

    path = _copy(runs["llama"], tmp_path)
    state = load_file(str(path / schema.STATS_FILE))
    save_file({k: v for k, v in state.items() if not k.startswith("L1.hist.")}, str(path / schema.STATS_FILE))
    run = kvmem.open_run(path)
    with pytest.raises(KvmemError) as e:
        run.stats
    message = str(e.value)
    assert "\n" not in message and "layer 1 has no 'hist' statistic" in message, message
    assert message.endswith(f"profile it again: kvmem profile {run.model_spec} --out {path} --force")
    code, _, err = cli(capsys, "report", str(path), "--out", str(tmp_path / "rep"))
    assert_one_line_error(code, err)
    assert "layer 1 has no 'hist' statistic" in err
