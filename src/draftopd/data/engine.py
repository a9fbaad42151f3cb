"""Rollouts from an inference engine (vLLM, SGLang) over its OpenAI-compatible HTTP API.

A GPU server makes rollouts far faster than local HF generate; this client writes them in the
same resumable format as `generate_rollouts`. Prompts are sent as chat-templated token ids to
`/v1/completions`, so the prompt tokens are exactly the local template's, and the response
token ids are read back as the engine sampled them (`token_ids`, else vLLM's `token_id:N`
logprob tokens); only when a server returns neither is the text re-tokenised, and meta.json
then says `"token_ids": "retokenized"`.

Exactly once: each prompt is one task whose retries return a single result, and one writer
(the calling thread) appends results whose id is not yet on disk, so a request that the server
answered but whose answer was lost, then retried, still yields one record.
"""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from urllib.parse import urlsplit

from draftopd.data.prompts import Prompt
from draftopd.data.rollouts import (FINISH_REASONS, Rollout, RolloutSettings, RolloutWriter, _problem, prompt_seeds,
                                    prompt_token_ids, read_meta, rollout_meta)
from draftopd.errors import DraftOPDError
from draftopd.model.target import EMBEDDED, resolve_target, stop_token_ids, target_identity

MAX_SLEEP = 30.0  # cap on one backoff pause, seconds
_TOKENIZER_LOCK = threading.Lock()  # fast tokenizers can fail ("Already borrowed") when shared by threads


class _Client:
    """JSON over HTTP with retries; a new connection per request keeps threads independent."""

    def __init__(self, base_url: str, *, timeout: float, retries: int, backoff: float, api_key: str | None,
                 stopping: threading.Event):
        parts = urlsplit(base_url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DraftOPDError(f"engine URL {base_url!r} must look like http://HOST:PORT")
        self.url = base_url.strip().rstrip("/")
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, parts.port
        # Accept both http://host:8000 and the OpenAI-style base URL http://host:8000/v1.
        self.prefix = parts.path.rstrip("/").removesuffix("/v1")
        self.timeout, self.tries, self.backoff = timeout, retries + 1, backoff
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.stopping = stopping

    def request(self, method: str, path: str, body: dict | None = None, *, what: str) -> dict:
        """The decoded JSON answer; connection errors, timeouts, 408/429 and 5xx are retried
        with exponential backoff, other HTTP errors raise at once (retrying cannot fix them)."""
        error = ""
        for attempt in range(self.tries):
            if attempt:
                if self.stopping.wait(min(self.backoff * 2 ** (attempt - 1), MAX_SLEEP)):
                    break  # the run is ending; do not keep a dead server busy
            try:
                status, data = self._once(method, path, body)
            except (OSError, http.client.HTTPException) as e:  # refused, reset, dropped, timed out
                error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if status < 400:
                try:
                    return json.loads(data)
                except ValueError:
                    raise DraftOPDError(f"server at {self.url} answered {what} with invalid JSON: "
                                        f"{data[:120]!r}") from None
            error = f"HTTP {status}: {_error_message(data)}"
            if status not in (408, 429) and status < 500:
                raise DraftOPDError(f"server at {self.url} rejected {what}: {error}")
        raise DraftOPDError(f"could not reach {self.url} after {self.tries} tries: {error}")

    def _once(self, method: str, path: str, body: dict | None) -> tuple[int, bytes]:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode("utf-8")
            conn.request(method, self.prefix + path, body=payload, headers=self.headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def _error_message(data: bytes) -> str:
    """The server's own explanation (OpenAI-style {"error": {"message"}}), else the body's start."""
    try:
        body = json.loads(data)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = (error.get("message") or error.get("detail")) if isinstance(error, dict) else None
        if message:
            return str(message).splitlines()[0][:300]
    except ValueError:
        pass
    return data[:200].decode("utf-8", "replace").strip() or "(empty body)"


def _served_models(client: _Client) -> list[str]:
    answer = client.request("GET", "/v1/models", what="GET /v1/models")
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise DraftOPDError(f"server at {client.url}: GET /v1/models did not return an OpenAI model list")
    return [str(m.get("id")) for m in data if isinstance(m, dict)]


def response_ids(choice: dict, tokenizer) -> tuple[list[int], bool]:
    """(response token ids, whether they are the engine's own) from one completion choice."""
    ids = choice.get("token_ids")
    if isinstance(ids, list) and all(type(t) is int for t in ids):
        return ids, True
    logprobs = choice.get("logprobs")
    tokens = logprobs.get("tokens") if isinstance(logprobs, dict) else None
    if tokens and all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        try:
            return [int(t.removeprefix("token_id:")) for t in tokens], True
        except ValueError:
            pass
    with _TOKENIZER_LOCK:
        return list(tokenizer.encode(choice.get("text") or "", add_special_tokens=False)), False


def finish(ids: list[int], reason: str, matched, stop: list[int]) -> tuple[list[int], str]:
    """(ids, finish_reason) in the local convention: a stopped response ends with its EOS.

    Engines may leave the EOS out (SGLang trims a matched stop; text never shows it), so a
    "stop" without one gets the matched stop id back, else the first stop id.
    """
    if ids and ids[-1] in stop:
        return ids, "stop"
    if reason == "stop" and stop:
        return ids + [matched if matched in stop else stop[0]], "stop"
    return ids, reason


def _request_body(model_name: str, prompt_ids: list[int], settings: RolloutSettings, stop: list[int],
                  seed: int) -> dict:
    body = {
        "model": model_name, "prompt": prompt_ids, "max_tokens": settings.max_new_tokens, "n": 1,
        "stream": False, "temperature": settings.temperature, "top_p": settings.top_p,
        # Engines fill unset knobs from the model's generation_config (e.g. a repetition
        # penalty), which would change even greedy output: settings alone decide.
        "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
        "stop_token_ids": stop, "ignore_eos": False,
        "return_token_ids": True,  # vLLM >= 0.10.2, SGLang: choices[0].token_ids
        "logprobs": 0, "return_tokens_as_token_ids": True,  # older vLLM: "token_id:N" logprob tokens
        "no_stop_trim": True, "skip_special_tokens": False,  # SGLang: keep the EOS
    }
    if settings.temperature > 0:
        body["seed"] = seed
    return body


def _complete(client: _Client, model_name: str, prompt: Prompt, prompt_ids: list[int], settings: RolloutSettings,
              stop: list[int], seed: int, tokenizer, vocab_size: int | None) -> tuple[Rollout, bool]:
    """One prompt's rollout and whether its token ids are exact."""
    what = f"prompt {prompt.id!r}"
    answer = client.request("POST", "/v1/completions", _request_body(model_name, prompt_ids, settings, stop, seed),
                            what=what)
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not choices or not isinstance(choices[0], dict):
        raise DraftOPDError(f"server at {client.url} answered {what} without choices: {str(answer)[:120]}")
    choice = choices[0]
    echoed = choice.get("prompt_token_ids")
    if isinstance(echoed, list) and echoed and echoed != prompt_ids:
        raise DraftOPDError(f"server at {client.url} changed the prompt tokens of {what} "
                            f"({len(prompt_ids)} sent, {len(echoed)} used); is a completion template configured?")
    ids, exact = response_ids(choice, tokenizer)
    rollout = engine_record(prompt, prompt_ids, ids, choice.get("finish_reason"),
                            choice.get("matched_stop", choice.get("stop_reason")), stop, vocab_size,
                            engine=f"server at {client.url}")
    return rollout, exact


def engine_record(prompt: Prompt, prompt_ids: list[int], ids: list[int], reason, matched, stop: list[int],
                  vocab_size: int | None, *, engine: str) -> Rollout:
    """An engine's answer (response ids, finish reason, matched stop) as a checked local record."""
    what = f"prompt {prompt.id!r}"
    if reason not in FINISH_REASONS:  # e.g. "abort": not a whole response
        raise DraftOPDError(f"{engine} ended {what} with finish_reason {reason!r}; rerun to resume")
    ids, reason = finish(list(ids), reason, matched, stop)
    rollout = Rollout(prompt.id, prompt_ids, ids, reason, {"source": prompt.source, **prompt.meta})
    problem = _problem(rollout, vocab_size)
    if problem:
        raise DraftOPDError(f"{engine} answered {what} with an unusable response: {problem}")
    return rollout


def engine_rollouts(base_url: str, model_name: str, tokenizer, prompts: list[Prompt], out_dir,
                    settings: RolloutSettings, *, target_identity: dict, stop_ids: list[int] | None = None,
                    prompt_spec: str = "", concurrency: int = 8, retries: int = 5, timeout: float = 60.0,
                    backoff: float = 0.5, api_key: str | None = None, progress: bool = True) -> Path:
    """Write the served target's response to each prompt into `out_dir`, resuming a run left there.

    `tokenizer` must be the served model's (it makes the prompt token ids); `target_identity`
    is recorded in meta.json so training can check the rollouts belong to its target.
    `stop_ids` default to the tokenizer's EOS. With temperature > 0, prompt i (in `prompts`
    order) is sampled with seed `sampling_seed(settings, p, i)`. `retries` are further tries after the first.
    """
    if concurrency < 1 or retries < 0 or timeout <= 0 or backoff < 0:
        raise DraftOPDError(f"need concurrency >= 1, retries >= 0, timeout > 0, backoff >= 0; got "
                            f"{concurrency}, {retries}, {timeout}, {backoff}")
    stopping = threading.Event()
    client = _Client(base_url, timeout=timeout, retries=retries, backoff=backoff, api_key=api_key, stopping=stopping)
    served = _served_models(client)
    if model_name not in served:
        raise DraftOPDError(f"server at {client.url} serves {', '.join(map(repr, served)) or 'no model'}, "
                            f"not the configured target {model_name!r}")

    stop = sorted(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    prompt_ids = prompt_token_ids(tokenizer, prompts, settings)
    seeds = prompt_seeds(prompts, settings)
    # The engine's weight dtype is not visible through the API; "engine" also keeps a local
    # run from resuming this directory (and the other way round).
    meta = rollout_meta(target_identity, "engine", settings, prompt_spec,
                        engine={"url": client.url, "model": model_name})
    vocab_size = target_identity.get("vocab_size")

    pool = ThreadPoolExecutor(concurrency, thread_name_prefix="draftopd-engine")
    try:
        with RolloutWriter(out_dir, meta, prompt_ids, progress=progress) as writer:
            exact_on_disk = read_meta(writer.out).get("token_ids") == "exact"
            todo = [p for p in prompts if p.id in prompt_ids and p.id not in writer.done]
            pending = {pool.submit(_complete, client, model_name, p, prompt_ids[p.id], settings, stop, seeds[p.id],
                                   tokenizer, vocab_size) for p in todo}
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                results, error = [], None
                for future in finished:
                    try:
                        results.append(future.result())
                    except DraftOPDError as e:
                        error = error or e
                new = [(r, exact) for r, exact in results if r.id not in writer.done]
                if exact_on_disk and not all(exact for _, exact in new):
                    writer.update_meta(token_ids="retokenized")  # before such records land
                    exact_on_disk = False
                if new:
                    writer.append([r for r, _ in new])  # one write + fsync for all that finished together
                if error:
                    raise error
    finally:
        stopping.set()
        pool.shutdown(wait=False, cancel_futures=True)
    return writer.out


def target_without_weights(spec: str) -> tuple[object, dict, list[int]]:
    """(tokenizer, target_identity, stop ids) of a target from its files alone, for runs whose
    target is served elsewhere: no weights are loaded. The identity equals `load_target`'s."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = resolve_target(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise DraftOPDError(f"target {spec!r}: could not load its tokenizer/config "
                            f"({str(e).splitlines()[0]})") from None
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        generation = None
    name = EMBEDDED[spec]["name"] if spec in EMBEDDED else spec
    return tokenizer, target_identity(config, name), stop_token_ids(tokenizer, generation)
