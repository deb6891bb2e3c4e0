"""The LLM-free baseline: a neuron described by its tokens, scored by lexical rules.

Key side: the ``N_TRIGGERS`` most frequent example tokens among the explain set's top examples (ties by
first appearance), compared after ``norm`` (strip, lower case). Value side: the first ``N_VALUES`` promoted
tokens shown to the explainer. The lexical rules stand in for the LLM in every scorer:
- detection: a snippet is predicted activating when one of its tokens is a trigger token;
- fuzzing: the marks are predicted correct when a marked token is a trigger token;
- simulation: a token's predicted activation is SCALE·count(token)/max count over the triggers (0 otherwise);
- value: a candidate is predicted promoted when it equals (after ``norm``) a described value token.
"""

from __future__ import annotations

from collections import Counter

from kvmem.explain.prompts import token_list
from kvmem.explain.scorers import SCALE

N_TRIGGERS = 5
N_VALUES = 5


def norm(tok: str) -> str:
    return str(tok).strip().lower()


def triggers(examples, n: int = N_TRIGGERS) -> dict[str, int]:
    """{normalised token: count} of the ``n`` most frequent example tokens (examples: (tokens, at) pairs);
    empty-after-strip tokens (spaces) are kept as themselves."""
    c: Counter = Counter()
    for tokens, at in examples:
        t = norm(tokens[at]) or tokens[at]
        c[t] += 1
    return dict(c.most_common(n))


def key_description(trig: dict[str, int]) -> str:
    return "the tokens " + token_list(list(trig)) if trig else "nothing seen"


def value_description(values) -> str:
    return "the tokens " + token_list(list(values)[:N_VALUES])


def _is(tok: str, trig) -> bool:
    return (norm(tok) or tok) in trig


def detect(trig, tokens) -> bool:
    return any(_is(t, trig) for t in tokens)


def fuzz(trig, tokens, marks) -> bool:
    return any(_is(tokens[i], trig) for i in marks)


def simulate(trig: dict[str, int], tokens) -> list[float]:
    top = max(trig.values()) if trig else 1
    return [SCALE * trig.get(norm(t) or t, 0) / top for t in tokens]


def value_pick(values, candidate: str) -> bool:
    return norm(candidate) in {norm(v) for v in list(values)[:N_VALUES]}
