"""Library errors name the parameter (``top``); the CLI shows the command's flag in its place (``--top``, or
``--neurons`` for trace's ``n_neurons``), one line, exit code 2."""

import pytest

from kvmem.cli import main
from kvmem.errors import KvmemError
from kvmem.models.kvmodel import from_hf
from kvmem.query import query
from kvmem.trace import trace
from tests.conftest import make_tiny


def test_for_flag_replaces_the_parameter_name():
    e = KvmemError("n_neurons must be at least 1", param="n_neurons")
    assert e.for_flag() == "--n-neurons must be at least 1"
    assert e.for_flag({"n_neurons": "--neurons"}) == "--neurons must be at least 1"
    assert KvmemError("plain").for_flag({"x": "--y"}) == "plain"
    assert KvmemError("bad value", param="k").for_flag() == "--k: bad value"


def test_library_errors_name_the_parameter(tiny_tokenizer):
    model = from_hf(make_tiny("llama"), tiny_tokenizer)
    with pytest.raises(KvmemError, match="^top must be at least 1") as info:
        query(model, "x y", top=0)
    assert info.value.param == "top"
    with pytest.raises(KvmemError, match="^n_neurons must be at least 1"):
        trace(model, "x y", n_neurons=0)


@pytest.mark.parametrize("argv, line", [
    (["query", "{p}", "x y", "--top", "0"], "error: --top must be at least 1"),
    (["trace", "{p}", "x y", "--neurons", "0"], "error: --neurons must be at least 1"),
    (["trace", "{p}", "x y", "--tokens", "0"], "error: --tokens must be at least 1"),
    (["vocab", "{p}", "0.1", "--top", "0"], "error: --top must be between 1 and the vocabulary size"),
    (["search", "{p}", " the", "--signs", "odd"], "error: --signs must be one of"),
])
def test_the_cli_shows_the_flag(capsys, tiny_dirs, argv, line):
    code = main([a.replace("{p}", str(tiny_dirs["llama"])) for a in argv])
    err = capsys.readouterr().err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith(line), err
