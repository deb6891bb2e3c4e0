"""Public functions say what they take: a parameter named ``model``, ``run`` or ``store`` is annotated (KVModel,
Run, TokenStore) in every module of the library (the CLI's typer functions take strings and paths)."""

import ast
from pathlib import Path

import kvmem

NAMES = {"model", "run", "store"}


def test_public_functions_annotate_model_run_and_store():
    root = Path(kvmem.__file__).parent
    missing = []
    for path in sorted(root.rglob("*.py")):
        if "cli" in path.relative_to(root).parts:
            continue
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if a.arg in NAMES and a.annotation is None:
                        missing.append(f"{path.relative_to(root)}:{node.lineno} {node.name}({a.arg})")
    assert not missing, "unannotated: " + ", ".join(missing)


def test_the_annotations_resolve():
    """The names the annotations use exist where TYPE_CHECKING imports them from."""
    from kvmem.models.kvmodel import KVModel
    from kvmem.profile.run import Run
    from kvmem.profile.tokens import TokenStore

    assert all(isinstance(c, type) for c in (KVModel, Run, TokenStore))
