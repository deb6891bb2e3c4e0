"""A small profiled run of a tiny gated model over a hostile corpus, and its reports."""

from __future__ import annotations

from unittest import mock

import pytest

# Every string here must render as text and run nothing; each script sets window.__pwned.
HOSTILE_DOCS = [
    "hello <script>window.__pwned = 1</script> world",
    "close </script><script>window.__pwned = 2</script> and </textarea><textarea>",
    'quotes " and \' and `back` "onmouseover="window.__pwned=3" x=\'',
    "a link javascript:window.__pwned=4 and <a href=\"javascript:window.__pwned=5\">click</a>",
    "<img src=x onerror=\"window.__pwned=6\"> <svg onload=window.__pwned=7> <!-- comment --> ]]> &amp; &lt;",
    "template {{ 7*7 }} {% raw %} ${window.__pwned=8} %{y} <b>bold</b>",
    "tabs\tand\nnewlines\r\n  spaces   \u2028line sep\u2029 zero\u200bwidth \u202eRTL override",
    "عربي مرحبا بالعالم עברית שלום 😀🎉👩‍👩‍👧 emoji and Ω≈ç",
    "The capital of France is Paris. The capital of Italy is Rome. " * 3,
    "def f(x):\n    return x + 1\n\nclass A:\n    pass\n",
]
HOSTILE_NAME = "corpus <img src=x onerror=window.__pwned=9> & \"q\".txt"


@pytest.fixture(scope="session")
def hostile_corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / HOSTILE_NAME
    path.write_text("\n\n".join(HOSTILE_DOCS * 2), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def report_run(tmp_path_factory, tiny_models, hostile_corpus):
    """(run, model): the tiny Llama (gated) profiled over the hostile corpus."""
    import kvmem

    model = tiny_models["llama"]
    out = tmp_path_factory.mktemp("runs") / "hostile"
    cfg = kvmem.ProfileConfig(corpus=str(hostile_corpus), seq_len=32, top_k=5, batch_size=4, checkpoint_every=1e9)
    return kvmem.profile(cfg, out, model=model), model


@pytest.fixture(scope="session")
def report_dir(tmp_path_factory, report_run):
    """The report built with the model (value side computed; contexts shaded from the run's windows)."""
    from kvmem.report import build_report

    run, model = report_run
    out = tmp_path_factory.mktemp("reports") / "hostile"
    rep = build_report(run, out, model=model)
    assert rep.path == out
    return out


@pytest.fixture(scope="session")
def plain_report_dir(tmp_path_factory, tiny_models, hostile_corpus):
    """A report of a non-gated model (GPT-2) built without the model and without any cached projection."""
    import kvmem
    from kvmem.report import build_report

    out = tmp_path_factory.mktemp("runs") / "gpt2"
    cfg = kvmem.ProfileConfig(corpus=str(hostile_corpus), seq_len=32, top_k=5, batch_size=4, checkpoint_every=1e9)
    run = kvmem.profile(cfg, out, model=tiny_models["gpt2"])
    rep = tmp_path_factory.mktemp("reports") / "gpt2"
    empty = tmp_path_factory.mktemp("empty-cache")
    with mock.patch("kvmem.vocab._cache_root", lambda: empty):
        build_report(run, rep)
    return rep


@pytest.fixture(scope="module")
def driver():
    """Headless Chromium for the browser tests, one per test module; a missing browser fails, never skips."""
    from report_browser import available, chromium

    why = available()
    if why is not None:
        pytest.fail(f"the browser test needs Chromium and Selenium: {why} (scripts/install.sh --test installs them)")
    with chromium() as d:
        yield d
