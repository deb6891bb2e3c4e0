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


def test_the_annotation_names_are_imported_where_they_are_used():
    """Every name an annotation of model / run / store uses is bound in its module (imported, under
    TYPE_CHECKING or not, or defined there): with postponed annotations nothing checks this at run time."""
    import builtins

    root = Path(kvmem.__file__).parent
    unbound = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        bound = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, (ast.ClassDef, ast.FunctionDef)):
                bound.add(node.name)
            elif isinstance(node, ast.Assign):
                bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs:
                    if a.arg in NAMES and a.annotation is not None:
                        names = {n.id for n in ast.walk(a.annotation) if isinstance(n, ast.Name)}
                        unbound += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names - bound]
    assert not unbound, "annotation names not imported: " + ", ".join(unbound)
