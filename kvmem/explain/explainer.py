"""``explain`` and ``score``: descriptions of neurons (key side per sign of m, value side) by the LLM-free
baseline and optionally an LLM backend, scored on held-out examples (kvmem.explain.data).

Rows (kvmem.explain.store.COLUMNS): one per (neuron, side, sign, explainer). The baseline is always
described and scored by its lexical rules (scorer "lexical"); an LLM's descriptions are scored by the
scorer backend given to ``score`` (or by the explaining backend in ``explain(..., score=True)``).
Scores of key rows: detection, fuzzing, simulation; of value rows: value. A backend without
log-probabilities leaves simulation NaN with the reason in ``simulation_note``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from kvmem.errors import KvmemError
from kvmem.explain import baseline as B
from kvmem.explain import prompts as P
from kvmem.explain.cache import Cache, key
from kvmem.explain.data import QUIET, NeuronData, gather, rng_for
from kvmem.explain.scorers import SCALE, balanced_accuracy, correlation, expected_value, nan_score

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel
    from kvmem.profile.run import Run

CHOICES = [str(k) for k in range(SCALE + 1)]


@dataclass(frozen=True)
class ExplainConfig:
    seed: int = 0  # the held-out split, the random windows, the distractors, neuron sampling
    n_top: int = 10  # top examples (one per document) per sign; half explain, half are scored
    n_bands: int = 3  # quantile bands of the sample store shown to the explainer (sign "+")
    per_band: int = 1  # examples per band
    before: int = 10  # tokens of context before / after the example token
    after: int = 3
    k_value: int = 10  # promoted tokens shown (ranks 0, 2, ...); as many held out (ranks 1, 3, ...)
    max_tokens: int = 40  # of an explainer / scorer reply
    temperature: float = 0.0  # 0: greedy; a failed reply is retried once at RETRY_TEMPERATURE
    sim_snippets: int = 4  # snippets simulated per description (half activating, half quiet)


RETRY_TEMPERATURE = 0.7


def now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def signs_of(run: Run) -> list[str]:
    return ["+", "-"] if run.gated else ["+"]


def select(run: Run, neurons=None, layers=None, sample: int | None = None, seed: int = 0) -> list[tuple[int, int]]:
    """(layer, neuron) pairs: ``neurons`` ('L.N' strings) if given, else every neuron of ``layers``
    (default: all profiled), then a seeded sample of ``sample`` of them (sorted)."""
    if neurons:
        pairs = [run.neuron(n) for n in neurons]
    else:
        layers = list(run.profiled_layers) if layers is None else list(layers)
        for layer in layers:
            if layer not in run.profiled_layers:
                raise KvmemError(f"--layers: layer {layer} was not profiled (layers: {run.profiled_layers})")
        pairs = [(layer, n) for layer in layers for n in range(run.d_mlp)]
    if sample is not None:
        if sample < 1:
            raise KvmemError("--sample must be at least 1")
        rng = np.random.default_rng(seed)
        pick = rng.choice(len(pairs), size=min(sample, len(pairs)), replace=False)
        pairs = [pairs[i] for i in sorted(pick.tolist())]
    return sorted(dict.fromkeys(pairs))


# --- prompts of one neuron --------------------------------------------------------------------
def key_messages(d: NeuronData, gated: bool) -> list[dict]:
    ex = [(s.tokens, s.at, s.acts(d.max_abs)[s.at]) for s in d.explain]
    bands = [(label, [(s.tokens, s.at, s.acts(d.max_abs)[s.at]) for s in ss]) for label, ss in d.bands if ss]
    return P.key_prompt(ex, bands, d.sign, gated)


def value_messages(d: NeuronData) -> list[dict]:
    return P.value_prompt(d.promoted, d.suppressed)


def _ask(backend, cache: Cache, batch: list[list[dict]], cfg: ExplainConfig, parse) -> list:
    """Replies of ``batch`` (cached), parsed; a failed or malformed reply is retried once at
    RETRY_TEMPERATURE, then None."""
    out: list = [None] * len(batch)
    todo = []
    for i, m in enumerate(batch):
        hit, reply = cache.get(key(backend.name, cfg.max_tokens, cfg.temperature, m))
        if hit and parse(reply) is not None:
            out[i] = parse(reply)
        else:
            todo.append(i)
    for temp in (cfg.temperature, RETRY_TEMPERATURE):
        if not todo:
            break
        replies = backend.complete_many([batch[i] for i in todo], cfg.max_tokens, temp)
        left = []
        for i, r in zip(todo, replies):
            parsed = parse(r)
            if parsed is None:
                left.append(i)
                continue
            cache.put(key(backend.name, cfg.max_tokens, cfg.temperature, batch[i]), r)
            out[i] = parsed
        todo = left
    return out


# --- scoring items ---------------------------------------------------------------------------
def detection_items(d: NeuronData, seed: int):
    items = [(s.tokens, True) for s in d.score] + [(s.tokens, False) for s in d.quiet]
    order = rng_for(seed + 1, d.layer, d.neuron, d.sign).permutation(len(items))
    return [items[i] for i in order]


def fuzzing_items(d: NeuronData, seed: int):
    """(tokens, marks, correct): each scored example marked on its example token (correct) and on a quiet
    token of the same snippet (activation < QUIET·max|m|; incorrect)."""
    rng = rng_for(seed + 2, d.layer, d.neuron, d.sign)
    items = []
    for s in d.score:
        items.append((s.tokens, [s.at], True))
        quiet = [j for j, c in enumerate(s.coefs) if c < QUIET * d.max_abs and j != s.at]
        if quiet:
            items.append((s.tokens, [int(rng.choice(quiet))], False))
    order = rng.permutation(len(items))
    return [items[i] for i in order]


def value_items(d: NeuronData, seed: int):
    items = [(t, True) for t in d.held_promoted] + [(t, False) for t in d.distractors]
    order = rng_for(seed + 3, d.layer, d.neuron, d.sign).permutation(len(items))
    return [items[i] for i in order]


def sim_snippets(d: NeuronData, cfg: ExplainConfig):
    h = cfg.sim_snippets // 2
    return d.score[:max(1, h)] + d.quiet[:max(1, cfg.sim_snippets - h)]


def score_baseline(d: NeuronData, side: str, cfg: ExplainConfig) -> dict:
    trig = B.triggers([(s.tokens, s.at) for s in d.explain])
    out = {}
    if side == "key":
        det = detection_items(d, cfg.seed)
        out.update(balanced_accuracy([B.detect(trig, t) for t, _ in det], [y for _, y in det]).columns("detection"))
        fz = fuzzing_items(d, cfg.seed)
        out.update(balanced_accuracy([B.fuzz(trig, t, m) for t, m, _ in fz], [y for *_, y in fz]).columns("fuzzing"))
        sn = sim_snippets(d, cfg)
        out.update(correlation([B.simulate(trig, s.tokens) for s in sn], [s.coefs for s in sn],
                               seed=cfg.seed).columns("simulation"))
        out.update(nan_score("key side").columns("value"))
    else:
        vi = value_items(d, cfg.seed)
        out.update(balanced_accuracy([B.value_pick(d.promoted, t) for t, _ in vi], [y for _, y in vi]).columns("value"))
        for s in ("detection", "fuzzing", "simulation"):
            out.update(nan_score("value side").columns(s))
    return out


def _key(r: dict) -> tuple[int, int, str]:
    return int(r["layer"]), int(str(r["neuron"]).split(".")[-1]), r["sign"]


def score_llm(rows: list[dict], data: dict, backend, cache: Cache, cfg: ExplainConfig) -> None:
    """Score the LLM rows (descriptions in row["description"]) in place with ``backend``."""
    key_rows = [r for r in rows if r["side"] == "key" and r["description"]]
    val_rows = [r for r in rows if r["side"] == "value" and r["description"]]
    det = {id(r): detection_items(data[_key(r)], cfg.seed) for r in key_rows}
    fz = {id(r): fuzzing_items(data[_key(r)], cfg.seed) for r in key_rows}
    vi = {id(r): value_items(data[_key(r)], cfg.seed) for r in val_rows}
    def numbers(n):
        return lambda reply: P.parse_numbers(reply, n)
    for r in key_rows:
        items = det[id(r)]
        picked = _ask(backend, cache, [P.detection_prompt(r["description"], [t for t, _ in items])], cfg,
                      numbers(len(items)))[0]
        pred = [None] * len(items) if picked is None else [i + 1 in picked for i in range(len(items))]
        r.update(balanced_accuracy(pred, [y for _, y in items]).columns("detection"))
        items = fz[id(r)]
        picked = _ask(backend, cache, [P.fuzzing_prompt(r["description"], [(t, m) for t, m, _ in items])], cfg,
                      numbers(len(items)))[0]
        pred = [None] * len(items) if picked is None else [i + 1 in picked for i in range(len(items))]
        r.update(balanced_accuracy(pred, [y for *_, y in items]).columns("fuzzing"))
        r.update(simulate_llm(r, data[_key(r)], backend, cache, cfg).columns("simulation"))
        r["scorer"] = backend.name
    for r in val_rows:
        items = vi[id(r)]
        picked = _ask(backend, cache, [P.value_score_prompt(r["description"], [t for t, _ in items])], cfg,
                      numbers(len(items)))[0]
        pred = [None] * len(items) if picked is None else [i + 1 in picked for i in range(len(items))]
        r.update(balanced_accuracy(pred, [y for _, y in items]).columns("value"))
        r["scorer"] = backend.name


def simulate_llm(row: dict, d: NeuronData, backend, cache: Cache, cfg: ExplainConfig):
    reason = backend.logprobs_reason if backend.kind == "local" else (
        "" if getattr(backend, "has_logprobs", False) else backend.logprobs_reason)
    if reason:
        return nan_score(f"simulation skipped: {reason}")
    preds, reals = [], []
    for s in sim_snippets(d, cfg):
        msgs, segs = P.simulation_segments(row["description"], s.tokens)
        k = key(backend.name, "sim", msgs, segs)
        hit, lps = cache.get(k)
        if not hit:
            lps = backend.segment_logprobs(msgs, segs, CHOICES)
            cache.put(k, lps)
        ev = [expected_value(lp) for lp in lps]
        preds.append(None if any(math.isnan(x) for x in ev) else ev)
        reals.append(s.coefs)
    return correlation(preds, reals, seed=cfg.seed)


# --- the commands ------------------------------------------------------------------------------
def _row(d: NeuronData, side: str, description: str, explainer: str, backend: str, messages, seed: int) -> dict:
    return {"neuron": d.id, "layer": d.layer, "side": side, "sign": d.sign, "description": description,
            "explainer": explainer, "backend": backend, "prompt_hash": P.sha256(messages) if messages else "",
            "created": now(), "scorer": "", "split_seed": seed}


def gather_all(run: Run, model: KVModel, pairs, cfg: ExplainConfig, seed: int | None = None) -> dict:
    s = cfg.seed if seed is None else seed
    return {(layer, n, sign): gather(run, model, layer, n, sign, seed=s, n_top=cfg.n_top, n_bands=cfg.n_bands,
                                     per_band=cfg.per_band, before=cfg.before, after=cfg.after, k_value=cfg.k_value)
            for layer, n in pairs for sign in signs_of(run)}


def plan(run: Run, data: dict, backend, count_tokens: Callable[[str], int] | None = None) -> dict:
    """Requests and prompt tokens an explain pass will send (tokens: ``count_tokens`` or chars/4)."""
    count = count_tokens or (lambda text: max(1, len(text) // 4))
    msgs = [m for d in data.values() for m in (key_messages(d, run.gated), value_messages(d))]
    return {"requests": len(msgs) if backend else 0,
            "prompt_tokens": sum(count(x["content"]) for m in msgs for x in m) if backend else 0,
            "neurons": len({(k[0], k[1]) for k in data}), "descriptions": len(msgs)}


def explain(run: Run, model: KVModel, pairs, backend=None, cfg: ExplainConfig = ExplainConfig(), *, score: bool = True,
            cache: Cache | None = None, data: dict | None = None,
            progress: Callable[[int, dict], None] | None = None) -> pd.DataFrame:
    """Describe ``pairs`` (baseline always, and ``backend``'s descriptions); with ``score`` the LLM rows are
    scored by the same backend. Returns the rows (not written: kvmem.explain.store.merge / write)."""
    cache = cache if cache is not None else Cache(run.path)
    data = data if data is not None else gather_all(run, model, pairs, cfg)
    rows = []
    for d in data.values():
        trig = B.triggers([(s.tokens, s.at) for s in d.explain])
        for side, desc in (("key", B.key_description(trig)), ("value", B.value_description(d.promoted))):
            r = _row(d, side, desc, "baseline", "baseline", None, cfg.seed)
            r.update(score_baseline(d, side, cfg))
            r["scorer"] = "lexical"
            rows.append(r)
    if backend is not None:
        items = list(data.values())
        for start in range(0, len(items), 4):
            chunk = items[start:start + 4]
            batch = [m for d in chunk for m in (key_messages(d, run.gated), value_messages(d))]
            replies = _ask(backend, cache, batch, cfg, P.parse_sentence)
            new = []
            for j, d in enumerate(chunk):
                for side, i in (("key", 2 * j), ("value", 2 * j + 1)):
                    r = _row(d, side, replies[i] or "", backend.name, backend.kind, batch[i], cfg.seed)
                    if replies[i] is None:
                        for s in ("detection", "fuzzing", "simulation", "value"):
                            r.update(nan_score("the explainer gave no usable reply").columns(s))
                    new.append(r)
            if score:
                score_llm(new, data, backend, cache, cfg)
            rows += new
            if progress:
                progress(len(chunk), dict(backend.usage))
    from kvmem.explain.store import conform

    return conform(pd.DataFrame(rows))


def score(run: Run, model: KVModel, table: pd.DataFrame, pairs, backend=None, cfg: ExplainConfig = ExplainConfig(), *,
          cache: Cache | None = None, progress=None) -> pd.DataFrame:
    """Score the stored descriptions of ``pairs`` (rows of ``table``) on their held-out examples (the split
    re-drawn from each row's split_seed): baseline rows by the lexical rules, the others by ``backend``
    (left as they are without one). Returns the rescored rows."""
    from kvmem.explain.store import conform

    cache = cache if cache is not None else Cache(run.path)
    want = {f"{a}.{b}" for a, b in pairs}
    rows = [r for r in conform(table).to_dict("records") if r["neuron"] in want]
    if not rows:
        raise KvmemError("no stored descriptions of the chosen neurons: run kvmem explain first")
    data = {}
    for r in rows:
        k = _key(r)
        seed = int(r["split_seed"])
        if (k, seed) not in data:
            data[(k, seed)] = gather(run, model, k[0], k[1], k[2], seed=seed, n_top=cfg.n_top, n_bands=cfg.n_bands,
                                     per_band=cfg.per_band, before=cfg.before, after=cfg.after, k_value=cfg.k_value)
    out = []
    for r in rows:
        k = _key(r)
        d = data[(k, int(r["split_seed"]))]
        c = ExplainConfig(**{**cfg.__dict__, "seed": int(r["split_seed"])})
        if r["explainer"] == "baseline":
            r.update(score_baseline(d, r["side"], c))
            r["scorer"] = "lexical"
        elif backend is not None and r["description"]:
            score_llm([r], {k: d}, backend, cache, c)
        out.append(r)
        if progress:
            progress(1, dict(backend.usage) if backend else {})
    return conform(pd.DataFrame(out))
