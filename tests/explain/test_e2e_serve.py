"""End to end with real LLMs, no fake server: ``kvmem explain`` and ``kvmem score`` through a real
``transformers serve`` (the ``transformers[serving]`` extra, installed by ``scripts/install.sh --test``) serving
the bundled SmolLM2-135M-Instruct on localhost, and through the in-process transformers backend; the
baseline beside them. The profiled runs are tiny (tests/explain/explain_runs.py); the explainer is the real
bundled model. Replies are checked against the requests the server answered (its cached replies), the
scores' arithmetic recomputed here by hand from those replies."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from explain_runs import make_run

import kvmem
from kvmem.explain import prompts as P
from kvmem.explain.cache import DIR, FILE, key
from kvmem.explain.data import gather
from kvmem.explain.explainer import ExplainConfig, detection_items, key_messages, value_messages
from tests.cli.test_core_cli import run as cli

pytestmark = pytest.mark.slow
TOKENS = "12"  # --max-tokens: short replies keep the CPU test well under a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and its engine process (its own process group, started by this test)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base URL, model name): ``transformers serve`` on a free localhost port with the bundled model's folder
    (kvmem.models.load.hf_folder), ready once /v1/models lists it as loaded; stopped when the module ends."""
    from kvmem.models.load import hf_folder

    import importlib.util

    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        pytest.fail('transformers[serving] is not installed: bash scripts/install.sh --test installs it')
    folder = str(hf_folder("smollm2-135m"))
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", folder,
                                 "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--dtype", "float32",
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited ({proc.returncode}): {log.read_text()[-2000:]}")
            try:
                models = httpx.get(url + "/v1/models", timeout=5).json()["data"]
                if any(m["id"] == folder and m.get("status", {}).get("value") == "loaded" for m in models):
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready after 240 s: {log.read_text()[-2000:]}")
            time.sleep(1)
        yield url, folder
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory, tiny_models):
    return make_run(tmp_path_factory, tiny_models["gpt2"], "gpt2-e2e"), tiny_models["gpt2"]


def _replies(run) -> dict:
    path = run.path / DIR / FILE
    return {json.loads(line)["key"]: json.loads(line)["reply"] for line in path.read_text().splitlines()}


def _balanced(pred, truth) -> float:
    pos = [p for p, t in zip(pred, truth) if t]
    neg = [not p for p, t in zip(pred, truth) if not t]
    return (sum(pos) / len(pos) + sum(neg) / len(neg)) / 2


def test_http_explain_and_score_through_transformers_serve(capsys, served, gpt2_run):
    url, name = served
    run, model = gpt2_run
    code, out, err = cli(capsys, "explain", str(run.path), "--neurons", "1.3", "--endpoint", url + "/v1",
                         "--explainer", name, "--max-tokens", TOKENS, "--concurrency", "2")
    assert code == 0, err
    assert "2 explainer requests" in out  # printed before starting: key + value of one non-gated neuron
    df = kvmem.open_run(run.path).explanations
    df = df[df.neuron == "1.3"]
    llm = df[df.explainer == name]
    assert len(llm) == 2 and set(llm.backend) == {"http"} and set(llm.side) == {"key", "value"}
    assert len(df[df.explainer == "baseline"]) == 2  # the baseline is always beside it
    d = gather(run, model, 1, 3, "+", seed=0, n_top=ExplainConfig.n_top, n_bands=ExplainConfig.n_bands,
               per_band=ExplainConfig.per_band, before=ExplainConfig.before, after=ExplainConfig.after)
    replies = _replies(run)
    for side, msgs in (("key", key_messages(d, run.gated)), ("value", value_messages(d))):
        row = llm[llm.side == side].iloc[0]
        assert row.prompt_hash == P.sha256(msgs)
        reply = replies.get(key(name, int(TOKENS), 0.0, msgs))
        if reply is not None:  # the server's usable reply (greedy, or its one retry), parsed into the description
            assert row.description == P.parse_sentence(reply) and row.description
        else:  # neither was usable: an empty description with the reason, never a crash
            assert row.description == "" and "no usable reply" in row.detection_note + row.value_note

    code, out, err = cli(capsys, "score", str(run.path), "--neurons", "1.3", "--endpoint", url, "--scorer", name,
                         "--max-tokens", TOKENS)
    assert code == 0, err
    df = kvmem.open_run(run.path).explanations
    df = df[df.neuron == "1.3"]
    k = df[(df.explainer == name) & (df.side == "key")].iloc[0]
    v = df[(df.explainer == name) & (df.side == "value")].iloc[0]
    # the chat endpoint gives no log-probabilities: simulation skipped, the reason recorded, nothing faked
    assert math.isnan(k.simulation) and k.simulation_n == 0
    assert "simulation skipped" in k.simulation_note and "no log-probabilities" in k.simulation_note
    if k.description:
        assert k.scorer == name and k.detection_n == len(detection_items(d, 0))
        # detection recomputed by hand from the server's reply to the detection prompt
        items = detection_items(d, 0)
        reply = _replies(run).get(key(name, int(TOKENS), 0.0,
                                      P.detection_prompt(k.description, [t for t, _ in items])))
        if reply is not None and P.parse_numbers(reply, len(items)) is not None:
            picked = P.parse_numbers(reply, len(items))
            want = _balanced([i + 1 in picked for i in range(len(items))], [y for _, y in items])
            assert k.detection == pytest.approx(want)
        assert 0 <= k.fuzzing <= 1 and k.fuzzing_lo <= k.fuzzing <= k.fuzzing_hi
    if v.description:
        assert 0 <= v.value <= 1 and v.value_n > 0 and v.value_lo <= v.value <= v.value_hi


def test_in_process_explainer_and_baseline_end_to_end(capsys, gpt2_run, smollm):
    run, model = gpt2_run
    code, out, err = cli(capsys, "explain", str(run.path), "--neurons", "2.5", "--local", "smollm2-135m",
                         "--score", "--max-tokens", TOKENS)
    assert code == 0, err
    assert "2 explainer requests" in out and "(plus scoring)" in out
    df = kvmem.open_run(run.path).explanations
    df = df[df.neuron == "2.5"]
    assert set(df.explainer) == {"baseline", "smollm2-135m"}
    llm = df[df.explainer == "smollm2-135m"]
    assert len(llm) == 2 and set(llm.backend) == {"local"} and set(llm.side) == {"key", "value"}
    assert (llm.description != "").any()
    for r in llm[(llm.side == "key") & (llm.description != "")].itertuples():
        # the in-process backend has log-probabilities: simulation is scored (or NaN only for a stated reason)
        assert r.scorer == "smollm2-135m" and "skipped" not in r.simulation_note
        assert r.simulation_n > 0 or "constant" in r.simulation_note or "nothing simulated" in r.simulation_note
        if not math.isnan(r.simulation):
            assert -1 <= r.simulation <= 1 and r.simulation_lo <= r.simulation_hi
        assert r.detection_n > 0 and r.fuzzing_n > 0
    base = df[df.explainer == "baseline"]
    assert len(base) == 2 and set(base.scorer) == {"lexical"} and base.description.str.startswith("the tokens").all()
    assert base[base.side == "key"].detection_n.iloc[0] > 0 and base[base.side == "value"].value_n.iloc[0] > 0


def test_local_backend_against_plain_transformers(smollm):
    """LocalBackend's batched, left-padded greedy generation equals one unpadded generate per prompt, and its
    segment log-probs equal a plain forward pass of the chat-templated text."""
    import torch

    from kvmem.explain.backends import LocalBackend

    b = LocalBackend("smollm2-135m", model=smollm, batch_size=2)
    batch = [P.chat("Name a colour."), P.chat("What is two plus two? Reply with the number only, please.")]
    got = b.complete_many(batch, max_tokens=4)
    tok, hf = smollm.tokenizer, smollm.hf
    for msgs, text in zip(batch, got):
        ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        with torch.inference_mode():
            gen = hf.generate(input_ids=torch.tensor([ids]), max_new_tokens=4, do_sample=False,
                              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        assert text == tok.decode(gen[0, len(ids):], skip_special_tokens=True)
    msgs, segs = P.simulation_segments("the word cat", ["The", " cat"])
    lps = b.segment_logprobs(msgs, segs, ["0", "5", "10"])
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids, ends = tok(text, add_special_tokens=False)["input_ids"], []
    for seg in segs:
        ids = ids + tok.encode(seg, add_special_tokens=False)
        ends.append(len(ids) - 1)
    with torch.inference_mode():
        lp = torch.log_softmax(hf(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    for j, end in enumerate(ends):
        assert set(lps[j]) <= {"0", "5", "10"} and {"0", "5"} <= set(lps[j])  # "10" only where it is one token
        for c, v in lps[j].items():
            assert v == pytest.approx(float(lp[end, tok.encode(c, add_special_tokens=False)[0]]), abs=1e-4)
