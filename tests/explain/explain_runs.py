"""Small profiled runs for the explain tests (tiny random models from tests/conftest.py)."""

from __future__ import annotations

DOCS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def f(x):\n    return x + 1\n\nclass A:\n    pass\n",
    "for item in items: print(item) # loops and iterators",
    "tabs\tand\nnewlines \u202eRTL override \x07 bell « marks » \\ backslash",
    "numbers 1 2 3 4 5 and words one two three four five",
    "the quick brown fox jumps over the lazy dog again and again",
]


def make_run(tmp_path_factory, model, name: str):
    import kvmem

    corpus = tmp_path_factory.mktemp("corpus") / f"{name}.txt"
    corpus.write_text("\n\n".join(DOCS * 4), encoding="utf-8")
    out = tmp_path_factory.mktemp("runs") / name
    cfg = kvmem.ProfileConfig(corpus=str(corpus), seq_len=32, top_k=8, batch_size=4, checkpoint_every=1e9)
    return kvmem.profile(cfg, out, model=model)
