"""Prompt building, safe token rendering, reply parsing, and the baseline's lexical rules, by hand."""

from kvmem.explain import baseline as B
from kvmem.explain import prompts as P


def test_safe_escapes_controls_and_marks():
    assert P.safe("a\nb\tc") == "a\\nb\\tc"
    assert P.safe("x\x07\u202ey") == "x\\u0007\\u202ey"
    assert P.safe("«»\\") == "\\«\\»\\\\"
    assert P.safe(" Paris") == " Paris"


def test_snippet_text_marks_and_activations():
    tokens = ["The", " cap", "ital", "\n", " «x»"]
    assert P.snippet_text(tokens, [1], {1: 7}) == "The« cap»(7)ital\\n \\«x\\»"
    assert P.snippet_text(tokens) == "The capital\\n \\«x\\»"
    # a token cannot forge a mark: the only unescaped « is the real one
    text = P.snippet_text(tokens, [4])
    assert text.count("«") == 2 and text.count("\\«") == 1


def test_key_prompt_lists_examples_bands_and_sign():
    ex = [(["a", " b", "c"], 1, 10), (["d", "e"], 0, 6)]
    bands = [("quantiles 0-33%", [(["f", "g"], 1, 2)])]
    msgs = P.key_prompt(ex, bands, "-", gated=True)
    user = msgs[-1]["content"]
    assert msgs[0]["role"] == "system" and msgs[-1]["role"] == "user"
    assert "1. a« b»(10)c" in user and "2. «d»(6)e" in user and "- f«g»(2)" in user
    assert "most negative" in user and "quantiles 0-33%" in user
    assert "negative" not in P.key_prompt(ex)[-1]["content"]


def test_value_and_scoring_prompts():
    v = P.value_prompt([" Paris", "\n"], ["x"])[-1]["content"]
    assert '" Paris", "\\n"' in v and '"x"' in v
    d = P.detection_prompt("capital\ncities", [["a", "b"], ["c"]])[-1]["content"]
    assert "capital\\ncities" in d and "1. ab" in d and "2. c" in d
    f = P.fuzzing_prompt("x", [(["a", "b"], [1])])[-1]["content"]
    assert "1. a«b»" in f
    msgs, segs = P.simulation_segments("x", ["a", "\n", "c"])
    assert segs == ["a\t", "unknown\n\\n\t", "unknown\nc\t"]
    assert P.sha256(msgs) == P.sha256([dict(m) for m in msgs]) != P.sha256(P.chat("y"))


def test_parse_numbers_and_sentences():
    assert P.parse_numbers("Snippets 1, 3 and 12.", 5) == {1, 3}
    assert P.parse_numbers("[2,5]", 5) == {2, 5}
    assert P.parse_numbers("None of them.", 5) == set()
    assert P.parse_numbers("I think the first", 5) is None
    assert P.parse_numbers(None, 5) is None
    assert P.parse_sentence('\n  Explanation: "Capital cities."\nmore') == "Capital cities."
    assert P.parse_sentence("I'm sorry, I cannot help") is None
    assert P.parse_sentence("  \n ") is None


def test_baseline_rules_by_hand():
    ex = [(["a", " Paris", "b"], 1), (["paris"], 0), (["x", " Rome"], 1)]
    trig = B.triggers(ex)
    assert trig == {"paris": 2, "rome": 1}
    assert B.key_description(trig) == 'the tokens "paris", "rome"'
    assert B.detect(trig, ["the", " ROME "]) and not B.detect(trig, ["the", "Romeo"])
    assert B.fuzz(trig, ["x", " Paris"], [1]) and not B.fuzz(trig, ["x", " Paris"], [0])
    assert B.simulate(trig, [" Paris", "x", "Rome"]) == [10.0, 0.0, 5.0]
    assert B.value_pick([" Paris", "Rome"], "paris ") and not B.value_pick(["Rome"], "Paris")
