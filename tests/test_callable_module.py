"""No module of kvmem is shadowed by a function of the same name: ``import kvmem.query`` gives the module, and
calling the module calls its function (the notebook API ``kvmem.query(model, prompt)``)."""

import importlib
import inspect
import pkgutil
import subprocess
import sys
import types

import kvmem
from kvmem.models.kvmodel import from_hf
from tests.conftest import make_tiny


def test_every_submodule_attribute_is_the_module():
    names = [m.name for m in pkgutil.iter_modules(kvmem.__path__) if m.name != "__main__"]
    for name in names:
        importlib.import_module(f"kvmem.{name}")
        assert isinstance(getattr(kvmem, name), types.ModuleType), name
        assert getattr(kvmem, name) is sys.modules[f"kvmem.{name}"], name


def test_import_in_a_fresh_interpreter_gives_the_module():
    code = ("import kvmem.query as q, kvmem.capture as c, kvmem.profile as p, types; "
            "assert all(isinstance(m, types.ModuleType) for m in (q, c, p)); print(q.stack_padded.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "stack_padded"


def test_calling_the_module_calls_its_function(tiny_tokenizer):
    model = from_hf(make_tiny("llama"), tiny_tokenizer)
    got = kvmem.query(model, "The value of x is", top=5)
    want = kvmem.query.query(model, "The value of x is", top=5)
    assert got.neurons["id"].tolist() == want.neurons["id"].tolist()
    assert inspect.signature(kvmem.query) == inspect.signature(kvmem.query.query)
    for name in ("capture", "intervene", "profile", "search", "trace"):
        module = getattr(kvmem, name)
        assert callable(module) and inspect.signature(module) == inspect.signature(getattr(module, name))
