"""The HTTP client's retries, backoff and error handling against httpx.MockTransport (unit tests of the
client, not an end-to-end test: helper 6's test_e2e_serve.py runs a real ``transformers serve``), and an
explain pass through it on a tiny run (failures counted, simulation skipped without log-probabilities)."""

import json
import math

import httpx
import pytest
from explain_runs import make_run

from kvmem.errors import KvmemError
from kvmem.explain.backends import OpenAIBackend, backend_from_options
from kvmem.explain.cache import Cache
from kvmem.explain.explainer import ExplainConfig, explain


def chat_reply(text, usage=(10, 3)):
    return httpx.Response(200, json={"choices": [{"message": {"role": "assistant", "content": text}}],
                                     "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]}})


def backend(handler, **kw):
    kw.setdefault("backoff", 0.0)
    return OpenAIBackend("http://localhost:8000", "m", transport=httpx.MockTransport(handler), **kw)


def test_retries_5xx_and_timeouts_then_succeeds():
    calls = []

    def handler(request):
        calls.append(request)
        if len(calls) == 1:
            return httpx.Response(503)
        if len(calls) == 2:
            raise httpx.ReadTimeout("slow", request=request)
        return chat_reply("fine")

    b = backend(handler, retries=3)
    assert b.complete([{"role": "user", "content": "hi"}]) == "fine"
    assert len(calls) == 3 and b.usage["retries"] == 2 and b.usage["failures"] == 0
    assert b.usage["prompt_tokens"] == 10 and b.usage["completion_tokens"] == 3
    body = json.loads(calls[-1].content)
    assert calls[-1].url.path == "/v1/chat/completions" and body["model"] == "m" and body["max_tokens"] == 60


def test_backoff_doubles(monkeypatch):
    slept = []
    monkeypatch.setattr("kvmem.explain.backends.time.sleep", slept.append)
    b = backend(lambda r: httpx.Response(500), retries=3, backoff=0.5)
    assert b.complete([{"role": "user", "content": "x"}]) is None
    assert slept == [0.5, 1.0, 2.0] and b.usage["failures"] == 1


@pytest.mark.parametrize("bad", [
    lambda r: httpx.Response(200, text="not json"),
    lambda r: httpx.Response(200, json={"choices": []}),
    lambda r: httpx.Response(200, json={"choices": [{"message": {"content": "   "}}]}),
])
def test_malformed_replies_are_retried_then_counted(bad):
    n = []

    def handler(r):
        n.append(1)
        return bad(r)

    b = backend(handler, retries=2)
    assert b.complete([{"role": "user", "content": "x"}]) is None
    assert len(n) == 3 and b.usage["failures"] == 1


def test_client_errors_and_unreachable_are_one_line_kvmem_errors():
    with pytest.raises(KvmemError, match="HTTP 401"):
        backend(lambda r: httpx.Response(401, text="bad key\nmore")).complete([{"role": "user", "content": "x"}])

    def refuse(r):
        raise httpx.ConnectError("refused", request=r)
    with pytest.raises(KvmemError, match="cannot connect"):
        backend(refuse).complete([{"role": "user", "content": "x"}])
    with pytest.raises(KvmemError, match="cannot connect"):
        backend(refuse).check()
    with pytest.raises(KvmemError, match="not an http"):
        OpenAIBackend("localhost:8000", "m")
    with pytest.raises(KvmemError, match="--api-key-env"):
        OpenAIBackend("https://api.example.org", "m", api_key_env="KVMEM_NO_SUCH_VAR")
    with pytest.raises(KvmemError, match="--explainer"):
        backend_from_options("http://localhost:1")
    assert backend_from_options() is None


def test_api_key_header_and_v1_suffix(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sekret")
    seen = []

    def handler(r):
        seen.append(r)
        return chat_reply("ok")

    b = OpenAIBackend("https://api.example.org/v1/", "m", api_key_env="MY_KEY", transport=httpx.MockTransport(handler))
    b.complete([{"role": "user", "content": "x"}])
    assert seen[0].headers["authorization"] == "Bearer sekret" and str(seen[0].url) == \
        "https://api.example.org/v1/chat/completions"


def test_logprobs_detected_from_the_completions_api():
    def vllm(r):
        if r.url.path.endswith("/completions") and not r.url.path.endswith("chat/completions"):
            return httpx.Response(200, json={"choices": [{"text": "4", "logprobs": {
                "top_logprobs": [{"4": -0.1, " 7": -2.0}]}}]})
        return chat_reply("x")

    b = backend(vllm)
    assert b.has_logprobs and b.logprobs_reason == ""
    assert b.segment_logprobs([{"role": "user", "content": "q"}], ["a\t"], ["4", "7", "9"]) == \
        [{"4": -0.1, "7": -2.0, "9": -math.inf}]
    plain = backend(lambda r: httpx.Response(404) if "chat" not in r.url.path else chat_reply("x"))
    assert not plain.has_logprobs and "no log-probabilities" in plain.logprobs_reason


def fake_server(request):
    """An OpenAI-compatible chat endpoint stand-in: descriptions, numbered picks, a refusal for value prompts."""
    if "chat" not in request.url.path:
        return httpx.Response(404)
    text = json.loads(request.content)["messages"][-1]["content"]
    if "what do the marked tokens have in common" in text:
        return chat_reply("Tokens of code.")
    if "what does the neuron promote" in text:
        return chat_reply("I'm sorry, I cannot help with that.")
    if "Which candidates" in text:
        return chat_reply("no idea")
    return chat_reply("1, 2")


def test_explain_through_http_counts_failures_and_skips_simulation(tmp_path_factory, tiny_models):
    model = tiny_models["gpt2"]
    run = make_run(tmp_path_factory, model, "http")
    b = backend(fake_server, retries=0)
    df = explain(run, model, [(1, 3), (2, 5)], b, ExplainConfig(seed=0), score=True, cache=Cache(run.path))
    llm = df[df.explainer == "m"]
    assert len(llm) == 4 and set(llm.backend) == {"http"}
    key, val = llm[llm.side == "key"], llm[llm.side == "value"]
    assert (key.description == "Tokens of code.").all() and (key.prompt_hash.str.len() == 64).all()
    assert key.simulation.isna().all() and key.simulation_note.str.contains("no log-probabilities").all()
    assert key.detection.notna().any() and (key.scorer == "m").all()
    # refusals: retried once at a higher temperature, then an empty description with a note, never a crash
    assert (val.description == "").all() and val.value_note.str.contains("no usable reply").all()
    # the cache: a second pass sends no explainer request for the descriptions already made
    before = b.usage["requests"]
    explain(run, model, [(1, 3)], b, ExplainConfig(seed=0), score=False, cache=Cache(run.path))
    assert b.usage["requests"] - before == 2  # only the two refused value prompts are asked again (1 + retry)
