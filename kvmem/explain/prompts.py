"""Prompts of the explainers and scorers, and tolerant parsing of the replies.

A snippet is a list of token strings (one document window around an example token) with per-token
activations on the integer scale 0..10 (kvmem.explain.scorers.scale, relative to the neuron's max |m|).
Token strings from the corpus or the vocabulary are rendered by ``safe``: control characters and
newlines shown as escapes (\\n, \\t, \\x..), the marks « » and the delimiters escaped, so a token can
neither break a line of the prompt nor forge a mark. The activating token is shown as «token» and, in
explainer prompts, followed by its activation: «token»(7).
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

MARK_L, MARK_R = "«", "»"
SYSTEM = ("You study neurons of a language model. Each neuron fires on some tokens. Answer briefly and "
          "follow the requested format exactly.")


def safe(tok: str) -> str:
    """A token string fit for one line of a prompt: control/format characters escaped, marks escaped."""
    out = []
    for ch in str(tok):
        if ch in (MARK_L, MARK_R, "\\"):
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def snippet_text(tokens, marks=(), acts=None) -> str:
    """The snippet as one line: tokens concatenated (safe), the tokens at ``marks`` as «tok» (with the
    activation appended as (a) when ``acts`` is given)."""
    marks = set(marks)
    parts = []
    for i, t in enumerate(tokens):
        s = safe(t)
        if i in marks:
            s = f"{MARK_L}{s}{MARK_R}" + (f"({acts[i]})" if acts is not None else "")
        parts.append(s)
    return "".join(parts)


def token_list(tokens) -> str:
    """Vocabulary tokens as a comma-separated list of quoted safe strings."""
    return ", ".join(f'"{safe(t)}"' for t in tokens)


def sha256(messages) -> str:
    """The prompt's hash: sha256 of its messages (role and content), hex."""
    h = hashlib.sha256()
    for m in messages:
        h.update(m["role"].encode() + b"\0" + m["content"].encode() + b"\0")
    return h.hexdigest()


def chat(user: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


# --- explainer prompts -------------------------------------------------------------------------
def key_prompt(examples, bands=(), sign: str = "+", gated: bool = False) -> list[dict]:
    """Explain what makes the neuron fire. ``examples``: [(tokens, at, act)] top examples (one per
    document), ``bands``: [(label, [(tokens, at, act)])] examples from quantile bands."""
    lines = []
    if gated:
        lines.append("This neuron's activation can be positive or negative; these examples are its most "
                     + ("positive" if sign == "+" else "negative") + " ones.")
    lines.append("Examples where the neuron fires; the token it fires on is in «» followed by its "
                 "activation from 0 to 10:")
    for i, (tokens, at, act) in enumerate(examples, 1):
        lines.append(f"{i}. {snippet_text(tokens, [at], {at: act})}")
    for label, exs in bands:
        lines.append(f"Weaker examples ({label}):")
        for tokens, at, act in exs:
            lines.append(f"- {snippet_text(tokens, [at], {at: act})}")
    lines.append("In one short sentence, what do the marked tokens have in common (what makes the neuron "
                 "fire)? Reply with the sentence only.")
    return chat("\n".join(lines))


def value_prompt(promoted, suppressed) -> list[dict]:
    """Explain what the neuron writes: the tokens its output makes more and less likely."""
    return chat("When this neuron fires, it makes these next tokens more likely: " + token_list(promoted)
                + "\nand these less likely: " + token_list(suppressed)
                + "\nIn one short sentence, what does the neuron promote? Reply with the sentence only.")


# --- scorer prompts ----------------------------------------------------------------------------
def detection_prompt(description: str, snippets) -> list[dict]:
    """Which numbered snippets (token lists, nothing marked) contain a token the neuron fires on?"""
    lines = [f"A neuron fires on: {safe(description)}", "Snippets:"]
    lines += [f"{i}. {snippet_text(t)}" for i, t in enumerate(snippets, 1)]
    lines.append("Which snippets contain something the neuron fires on? Reply with their numbers separated "
                 "by commas, or 'none'.")
    return chat("\n".join(lines))


def fuzzing_prompt(description: str, snippets) -> list[dict]:
    """``snippets``: [(tokens, marks)]: are the marked tokens ones the description says it fires on?"""
    lines = [f"A neuron fires on: {safe(description)}", "In each snippet some tokens are marked «like this»:"]
    lines += [f"{i}. {snippet_text(t, m)}" for i, (t, m) in enumerate(snippets, 1)]
    lines.append("In which snippets are the marked tokens ones the neuron fires on? Reply with their numbers "
                 "separated by commas, or 'none'.")
    return chat("\n".join(lines))


def value_score_prompt(description: str, candidates) -> list[dict]:
    lines = [f"When a neuron fires it makes some next tokens more likely: {safe(description)}", "Candidates:"]
    lines += [f'{i}. "{safe(t)}"' for i, t in enumerate(candidates, 1)]
    lines.append("Which candidates does it make more likely? Reply with their numbers separated by commas, "
                 "or 'none'.")
    return chat("\n".join(lines))


def simulation_segments(description: str, tokens) -> tuple[list[dict], list[str]]:
    """OpenAI's all-at-once simulation: (messages, segments). The assistant's reply is the concatenation of
    the segments, one per token: 'token<TAB>' (the activation 0..10 is read from the log-probs of the next
    token after each segment) followed by 'unknown\\n' (the next segment begins with it)."""
    msgs = chat(f"A neuron fires on: {safe(description)}\nFor each token of the text below, give the "
                "neuron's activation from 0 (none) to 10 (strongest), one token per line as token<TAB>number.")
    segs = []
    for i, t in enumerate(tokens):
        segs.append(("" if i == 0 else "unknown\n") + f"{safe(t)}\t")
    return msgs, segs


# --- parsing ---------------------------------------------------------------------------------------
_NONE = re.compile(r"\b(none|no snippets?|no candidates?|nothing)\b", re.I)


def parse_numbers(reply: str, n: int) -> set[int] | None:
    """1-based numbers in 1..n from a reply ('1, 3 and 4', '[2,5]'): a set; an explicit 'none' -> empty set;
    no number and no 'none' -> None (malformed)."""
    if reply is None:
        return None
    found = {int(x) for x in re.findall(r"\d+", reply) if 1 <= int(x) <= n}
    if found:
        return found
    if _NONE.search(reply):
        return set()
    return None


def parse_sentence(reply: str) -> str | None:
    """The first non-empty line of a description reply, stripped of quotes and labels; None if empty or a
    refusal."""
    if reply is None:
        return None
    for line in reply.strip().splitlines():
        line = re.sub(r"^(explanation|description|answer)\s*:\s*", "", line.strip(), flags=re.I).strip(" \"'*")
        if line:
            if re.match(r"^(i'm sorry|i am sorry|i cannot|i can't|as an ai)", line, re.I):
                return None
            return line[:400]
    return None
