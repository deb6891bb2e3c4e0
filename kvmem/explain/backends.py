"""LLM backends behind one interface (``LLM``): an OpenAI-compatible HTTP endpoint and an in-process
transformers model.

  complete_many(list of messages, max_tokens, temperature) -> list[str | None]   None: failed after retries
  segment_logprobs(messages, segments, choices) -> list[dict[choice, logprob]]    one dict per segment: the
      log-probs of the next token after the assistant reply's text up to the end of that segment
  logprobs_reason: "" when segment_logprobs works, else why simulation is skipped
  usage: {"requests", "prompt_tokens", "completion_tokens", "failures", "retries"}

HTTP: ``POST {endpoint}/v1/chat/completions``; the API key from the environment variable ``api_key_env``
(optional for localhost). Timeouts and 5xx / 429 / malformed replies are retried ``retries`` times with
exponential backoff (``backoff``·2^attempt seconds), then counted as a failure (None); an unreachable
endpoint, a bad URL or a 4xx reply is a one-line KvmemError. Log-probabilities: the chat endpoint has none
(``transformers serve``); ``/v1/completions`` with ``logprobs`` (vLLM) is probed once and used if it
returns top log-probs.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol

from kvmem.errors import KvmemError

if TYPE_CHECKING:
    from kvmem.models.kvmodel import KVModel


class LLM(Protocol):
    name: str
    kind: str
    logprobs_reason: str
    usage: dict

    def complete_many(self, batch: list[list[dict]], max_tokens: int, temperature: float) -> list[str | None]: ...

    def segment_logprobs(self, messages: list[dict], segments: list[str], choices: list[str]) -> list[dict]: ...


def _usage() -> dict:
    return {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "failures": 0, "retries": 0}


class OpenAIBackend:
    kind = "http"

    def __init__(self, endpoint: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 3, backoff: float = 1.0, concurrency: int = 4, transport=None):
        import httpx

        url = endpoint.rstrip("/")
        try:
            parsed = httpx.URL(url)
        except Exception as e:  # httpx.InvalidURL and friends
            raise KvmemError(f"--endpoint {endpoint!r} is not a URL ({e})") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise KvmemError(f"--endpoint {endpoint!r} is not an http(s) URL")
        self.base = url if url.endswith("/v1") else url + "/v1"
        local = parsed.host in ("localhost", "127.0.0.1", "::1", "0.0.0.0")
        key = os.environ.get(api_key_env or "", "")
        if not key and not local:
            raise KvmemError(f"--api-key-env: the environment variable {api_key_env!r} holds no API key for "
                             f"{endpoint}")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.name, self.endpoint = model, endpoint
        self.retries, self.backoff, self.concurrency = int(retries), float(backoff), max(1, int(concurrency))
        self.client = httpx.Client(timeout=timeout, headers=headers, transport=transport)
        self.usage = _usage()
        self._logprobs: bool | None = None
        self.logprobs_reason = "not probed yet"

    def check(self) -> None:
        """Raise a one-line KvmemError unless the endpoint answers (GET /v1/models; any HTTP status will do)."""
        import httpx

        try:
            self.client.get(self.base + "/models")
        except (httpx.ConnectError, httpx.UnsupportedProtocol, httpx.ConnectTimeout) as e:
            raise KvmemError(f"--endpoint {self.endpoint}: cannot connect ({e})") from None
        except httpx.InvalidURL as e:
            raise KvmemError(f"--endpoint {self.endpoint!r} is not a valid URL ({e})") from None
        except httpx.HTTPError as e:
            raise KvmemError(f"--endpoint {self.endpoint}: no answer ({type(e).__name__}: {e})") from None

    # --- requests ------------------------------------------------------------------------------
    def _post(self, path: str, body: dict, read):
        """POST with retries; ``read(json) -> value`` raises on a malformed reply. None after retries."""
        import httpx

        for attempt in range(self.retries + 1):
            if attempt:
                self.usage["retries"] += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                r = self.client.post(self.base + path, json=body)
            except (httpx.ConnectError, httpx.UnsupportedProtocol) as e:
                raise KvmemError(f"--endpoint {self.endpoint}: cannot connect ({e})") from None
            except httpx.InvalidURL as e:
                raise KvmemError(f"--endpoint {self.endpoint!r} is not a valid URL ({e})") from None
            except (httpx.TimeoutException, httpx.RemoteProtocolError, httpx.ReadError):
                continue
            self.usage["requests"] += 1
            if r.status_code >= 500 or r.status_code == 429:
                continue
            if r.status_code >= 400:
                raise KvmemError(f"--endpoint {self.endpoint}: HTTP {r.status_code} on {path} "
                                 f"({r.text.strip().splitlines()[0][:200] if r.text.strip() else 'no body'})")
            try:
                data = r.json()
                value = read(data)
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            u = data.get("usage") or {}
            self.usage["prompt_tokens"] += int(u.get("prompt_tokens") or 0)
            self.usage["completion_tokens"] += int(u.get("completion_tokens") or 0)
            return value
        self.usage["failures"] += 1
        return None

    def complete(self, messages, max_tokens: int = 60, temperature: float = 0.0) -> str | None:
        def read(d):
            text = d["choices"][0]["message"]["content"]
            if not isinstance(text, str) or not text.strip():
                raise ValueError("empty reply")
            return text
        body = {"model": self.name, "messages": messages, "max_tokens": int(max_tokens),
                "temperature": float(temperature)}
        return self._post("/chat/completions", body, read)

    def complete_many(self, batch, max_tokens: int = 60, temperature: float = 0.0) -> list[str | None]:
        if self.concurrency == 1 or len(batch) <= 1:
            return [self.complete(m, max_tokens, temperature) for m in batch]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda m: self.complete(m, max_tokens, temperature), batch))

    # --- log-probabilities (completions API) ---------------------------------------------------
    @staticmethod
    def _text(messages) -> str:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def _top(self, prompt: str, n: int = 20):
        def read(d):
            top = d["choices"][0]["logprobs"]["top_logprobs"][0]
            if not isinstance(top, dict) or not top:
                raise ValueError("no top log-probs")
            return top
        return self._post("/completions", {"model": self.name, "prompt": prompt, "max_tokens": 1,
                                           "temperature": 0.0, "logprobs": n}, read)

    @property
    def has_logprobs(self) -> bool:
        if self._logprobs is None:
            import httpx

            try:
                r = self.client.post(self.base + "/completions", json={
                    "model": self.name, "prompt": "1, 2, 3,", "max_tokens": 1, "logprobs": 5})
                top = r.json()["choices"][0]["logprobs"]["top_logprobs"][0] if r.status_code == 200 else None
                self._logprobs = isinstance(top, dict) and bool(top)
            except (httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
                self._logprobs = False
            self.logprobs_reason = "" if self._logprobs else (
                f"{self.endpoint} gives no log-probabilities (its /v1/completions returned no top_logprobs)")
        return self._logprobs

    def segment_logprobs(self, messages, segments, choices) -> list[dict]:
        if not self.has_logprobs:
            raise KvmemError(self.logprobs_reason)
        prefix, out = self._text(messages), []
        for seg in segments:
            prefix += seg
            top = self._top(prefix) or {}
            out.append({c: max((v for k, v in top.items() if k.strip() == c), default=float("-inf")) for c in choices})
        return out


class LocalBackend:
    """An in-process chat model (kvmem.load): batched greedy (temperature 0) or seeded sampled generation;
    log-probabilities from one forward pass."""

    kind = "local"
    logprobs_reason = ""

    def __init__(self, model_name: str = "smollm2-135m", *, model=None, seed: int = 0, batch_size: int = 8,
                 device: str = "cpu"):
        if model is None:
            import kvmem

            model = kvmem.load(model_name, device=device)
        self.model, self.name, self.seed, self.batch_size = model, model_name, seed, max(1, int(batch_size))
        self.tok = model.tokenizer
        if getattr(self.tok, "chat_template", None) is None:
            raise KvmemError(f"--local {model_name}: the tokenizer has no chat template")
        self.usage = _usage()

    def _ids(self, messages) -> list[int]:
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)

    def complete_many(self, batch, max_tokens: int = 60, temperature: float = 0.0) -> list[str | None]:
        import torch

        out: list[str | None] = []
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for a in range(0, len(batch), self.batch_size):
            seqs = [self._ids(m) for m in batch[a:a + self.batch_size]]
            width = max(map(len, seqs))
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(seqs):  # left padding
                ids[i, width - len(s):] = torch.tensor(s)
                mask[i, width - len(s):] = 1
            kw = {"do_sample": temperature > 0}
            if temperature > 0:
                torch.manual_seed(self.seed)
                kw["temperature"] = float(temperature)
            with torch.inference_mode():
                gen = self.model.hf.generate(input_ids=ids.to(self.model.device), attention_mask=mask.to(self.model.device),
                                             max_new_tokens=int(max_tokens), pad_token_id=pad, **kw)
            new = gen[:, width:].cpu()
            self.usage["requests"] += len(seqs)
            self.usage["prompt_tokens"] += sum(map(len, seqs))
            for row in new:
                n = int((row != pad).sum())
                self.usage["completion_tokens"] += n
                text = self.tok.decode(row, skip_special_tokens=True)
                out.append(text if text.strip() else None)
                if not text.strip():
                    self.usage["failures"] += 1
        return out

    def segment_logprobs(self, messages, segments, choices) -> list[dict]:
        import torch

        ids = self._ids(messages)
        ends = []
        for seg in segments:
            ids += self.tok.encode(seg, add_special_tokens=False)
            ends.append(len(ids) - 1)
        choice_ids = {}
        for c in choices:
            enc = self.tok.encode(c, add_special_tokens=False)
            if len(enc) == 1:
                choice_ids[c] = enc[0]
        with torch.inference_mode():
            logits = self.model.hf(input_ids=torch.tensor([ids], device=self.model.device)).logits[0].float()
        lp = torch.log_softmax(logits[ends], dim=-1).cpu()
        self.usage["requests"] += 1
        self.usage["prompt_tokens"] += len(ids)
        return [{c: float(lp[j, i]) for c, i in choice_ids.items()} for j in range(len(ends))]


def backend_from_options(endpoint: str | None = None, explainer: str | None = None, *, local: str | None = None,
                         api_key_env: str = "OPENAI_API_KEY", concurrency: int = 4, timeout: float = 60.0,
                         retries: int = 3, seed: int = 0, model: KVModel | None = None):
    """The backend the CLI options ask for: an endpoint (with --explainer NAME), --local MODEL, or None
    (the baseline only)."""
    if endpoint and local:
        raise KvmemError("give either --endpoint or --local, not both")
    if endpoint:
        if not explainer:
            raise KvmemError("--endpoint needs --explainer NAME (the model name the endpoint serves)")
        return OpenAIBackend(endpoint, explainer, api_key_env, timeout=timeout, retries=retries, concurrency=concurrency)
    if explainer and not endpoint:
        raise KvmemError("--explainer names the endpoint's model: give --endpoint URL too (or --local MODEL)")
    if local:
        return LocalBackend(local, model=model, seed=seed)
    return None
