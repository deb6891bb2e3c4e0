"""The report half of scripts/bench_profile.py: the issue-14 bars, the projection and the markdown table.

Pure functions of the measured results (a dict per method: tokens_per_s, seconds, peak_bytes, ...), tested by
hand computations in tests/scripts/test_bench_smoke.py.
"""

from __future__ import annotations

# published figures the projection is set beside (not re-measured here)
PUBLISHED = [
    {"who": "GLUScope", "hardware": "1x A100", "tokens": 20_000_000, "hours": "10-20 per model",
     "tokens_per_s": "~280 (8B)", "note": "one model's profile, 20M tokens by default"},
    {"who": "Transluce", "hardware": "2x A100", "tokens": None, "hours": "~64",
     "tokens_per_s": None, "note": "exemplars of all 458,752 neurons of Llama-3.1-8B, one forward pass per layer"},
]
PROJECT_TOKENS = (20_000_000, 100_000_000)


def ratio(r: dict, a: str, b: str) -> float | None:
    ta, tb = r.get(a, {}).get("tokens_per_s"), r.get(b, {}).get("tokens_per_s")
    return ta / tb if ta and tb else None


def check_bars(shape: str, results: dict, kv: str, stats_size: int | None) -> list[dict]:
    """The issue's bars for this shape, each {bar, value, need, ok} (ok None: a figure is missing)."""
    bars = []

    def bar(name, value, need):
        bars.append({"bar": name, "value": value, "need": need, "ok": None if value is None else value >= need})
    if shape in ("gpt2-small", "tiny-gpt2"):
        bar(f"{kv} / forward+logits", ratio(results, kv, "forward+logits"), 1.5)
        bar(f"{kv} / tlens-cache", ratio(results, kv, "tlens-cache"), 4.0)
    if shape in ("llama3-8b", "tiny-llama"):
        bar(f"{kv} / forward-no-head", ratio(results, kv, "forward-no-head"), 0.9)
    fwd, mine = results.get("forward-no-head", {}).get("peak_bytes"), results.get(kv, {}).get("peak_bytes")
    if fwd is not None and mine is not None and stats_size is not None:  # as a ratio: allowed / used >= 1
        bars.append({"bar": f"{kv} peak <= forward-no-head peak + statistics", "value": (fwd + stats_size) / max(mine, 1),
                     "need": 1.0, "ok": mine <= fwd + stats_size, "peak_bytes": mine, "allowed_bytes": fwd + stats_size})
    return bars


def project(tokens_per_s: float | None, n_neurons: int) -> list[dict]:
    if not tokens_per_s:
        return []
    return [{"tokens": n, "hours": n / tokens_per_s / 3600, "neurons": n_neurons} for n in PROJECT_TOKENS]


def size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def markdown(rep: dict) -> str:
    partial = "" if rep["final"] else " (partial: the run stopped before its end)"
    lines = [f"### {rep['shape']}{partial}: {rep['n_layers']} layers x {rep['d_mlp']} neurons, {rep['tokens']:,} tokens, "
             f"rows of {rep['seq_len']}, batch {rep['batch']} rows, {rep['env']['device']} {rep['env']['dtype']}"
             f"{' (' + rep['env']['gpu'] + ')' if rep['env'].get('gpu') else ''}", "",
             "| method | tok/s | seconds | peak memory | x forward+logits | x forward-no-head | note |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    res = rep["results"]
    for name, r in res.items():
        if "error" in r:
            lines.append(f"| {name} | failed | | | | | {r['error'][:120]} |")
            continue
        fmt = [f"{x:.2f}" if x is not None else "" for x in (ratio(res, name, "forward+logits"),
                                                            ratio(res, name, "forward-no-head"))]
        note = f"compile {r['compile_seconds']:.1f} s (untimed)" if "compile_seconds" in r else ""
        note += f"bridge boot {r['setup_seconds']:.1f} s (untimed)" if "setup_seconds" in r else ""
        note += f"{r['oom_backoffs']} out-of-memory back-offs" if r.get("oom_backoffs") else ""
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['seconds']:.2f} | {size(r['peak_bytes'])} | "
                     f"{fmt[0]} | {fmt[1]} | {note} |")
    if rep.get("stats_bytes") is not None:
        lines += ["", f"Statistics' own size (LayerStats state, all layers): {size(rep['stats_bytes'])}; peak memory: "
                  f"{next(iter(r['peak_note'] for r in res.values() if 'peak_note' in r), '')}"]
    if rep["bars"]:
        lines += ["", "| bar | measured | needed | met |", "| --- | ---: | ---: | --- |"]
        for b in rep["bars"]:
            v = "missing" if b["value"] is None else f"{b['value']:.2f}x"
            lines.append(f"| {b['bar']} | {v} | {b['need']:.2f}x | {'-' if b['ok'] is None else 'yes' if b['ok'] else 'NO'} |")
    if rep["projection"]:
        of = " of Llama-3.1-8B (this shape)" if rep["shape"] == "llama3-8b" else " of this shape"
        lines += ["", f"Projected hours, all {rep['n_layers'] * rep['d_mlp']:,} neurons{of}, one "
                  f"{rep['env'].get('gpu', rep['env']['device'])}, at the {rep['kvmem_method']} rate measured here:", "",
                  "| who | hardware | tokens | hours | tok/s |", "| --- | --- | ---: | ---: | ---: |"]
        for p in rep["projection"]:
            lines.append(f"| kvmem (projected) | 1x {rep['env'].get('gpu', rep['env']['device'])} | {p['tokens']:,} | "
                         f"{p['hours']:.2f} | {p['tokens'] / p['hours'] / 3600:,.0f} |")
        for p in PUBLISHED:
            lines.append(f"| {p['who']} (published; {p['note']}) | {p['hardware']} | "
                         f"{'' if p['tokens'] is None else format(p['tokens'], ',')} | {p['hours']} | {p['tokens_per_s'] or ''} |")
        lines.append("\nPublished figures are on other hardware (A100): the ratio mixes the method with the device.")
    return "\n".join(lines) + "\n"
