"""A minimal OpenAI-compatible server over an HF model, for tests and CPU-only users.

It speaks the subset of the vLLM/SGLang API that `engine_rollouts` uses: `GET /v1/models` and
greedy `POST /v1/completions` with a token-id prompt, answering with text and `token_ids`.
Requests are served one at a time (the model is not thread-safe, and a CPU has nothing to gain
from overlapping them); greedy answers are deterministic, so recent ones are cached and a client
retrying an answer it lost costs nothing. `drop_every=N` closes the connection without an answer on every Nth
completion, after computing it, to test that clients neither lose nor duplicate work.

    python -m draftopd.data.engine_server --target smollm2-135m --port 8011
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from draftopd.data.rollouts import RolloutSettings, generate_batch, generation_config
from draftopd.errors import DraftOPDError
from draftopd.model.target import stop_token_ids

HOST = "127.0.0.1"  # never reachable from other machines
CACHE_SIZE = 1024  # answers kept, most recently used first


class _BadRequest(Exception):
    pass


class EngineServer:
    """Serves `model` as `name` on 127.0.0.1:`port` (0 = any free port) from a background thread."""

    def __init__(self, model, tokenizer, name: str, *, port: int = 0, drop_every: int = 0, verbose: bool = False):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.drop_every, self.verbose = drop_every, verbose
        self.stop = stop_token_ids(tokenizer, model.generation_config)
        self.completions = 0  # completion requests received, dropped ones included
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple, list[int]] = OrderedDict()  # (prompt, max_tokens, stop) -> response ids
        self._httpd = ThreadingHTTPServer((HOST, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.engine = self
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self._httpd.server_address[1]}"

    def start(self) -> "EngineServer":
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="draftopd-engine-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> "EngineServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "owned_by": "draftopd"}]}

    def complete(self, body: dict) -> tuple[dict, bool]:
        """(the completion answer, whether to drop it instead of sending it)."""
        if body.get("model") != self.name:
            raise _BadRequest(f"The model `{body.get('model')}` does not exist; this server serves `{self.name}`.")
        prompt = body.get("prompt")
        if not (isinstance(prompt, list) and prompt and all(type(t) is int and 0 <= t < len(self.tokenizer)
                                                               for t in prompt)):
            raise _BadRequest("'prompt' must be a non-empty list of token ids (text prompts are not supported)")
        max_tokens = body.get("max_tokens", 16)
        if type(max_tokens) is not int or max_tokens < 1:
            raise _BadRequest(f"'max_tokens' must be a positive integer, got {max_tokens!r}")
        if body.get("temperature", 1.0) != 0:
            raise _BadRequest("only greedy decoding is supported: set 'temperature' to 0")
        if body.get("n", 1) != 1 or body.get("stream"):
            raise _BadRequest("only n=1 without streaming is supported")
        stop = sorted(body.get("stop_token_ids") or self.stop)
        with self._lock:
            self.completions += 1
            number = self.completions
            ids = self._greedy(prompt, max_tokens, stop)
        choice = {"index": 0, "text": self.tokenizer.decode(ids, skip_special_tokens=True), "logprobs": None,
                  "finish_reason": "stop" if ids[-1] in stop else "length"}
        if body.get("return_token_ids"):
            choice.update(token_ids=ids, prompt_token_ids=prompt)
        answer = {"id": f"cmpl-{number}", "object": "text_completion", "created": int(time.time()),
                  "model": self.name, "choices": [choice],
                  "usage": {"prompt_tokens": len(prompt), "completion_tokens": len(ids),
                            "total_tokens": len(prompt) + len(ids)}}
        return answer, bool(self.drop_every) and number % self.drop_every == 0

    def _greedy(self, prompt: list[int], max_tokens: int, stop: list[int]) -> list[int]:
        key = (tuple(prompt), max_tokens, tuple(stop))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (stop or [0])[0]
        config = generation_config(RolloutSettings(max_new_tokens=max_tokens), stop, pad_id)
        ids = generate_batch(self.model, [prompt], config, pad_id, set(stop))[0]
        self._cache[key] = ids
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return ids


class _Handler(BaseHTTPRequestHandler):
    server_version = "draftopd-engine"

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, self.server.engine.models())
        else:
            self._error(404, f"no route {self.path}")

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/completions":
            self._error(404, f"no route {self.path}")
            return
        try:
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
            if not isinstance(body, dict):
                raise _BadRequest("the request body must be a JSON object")
            answer, drop = self.server.engine.complete(body)
        except ValueError:
            self._error(400, "the request body is not valid JSON")
            return
        except _BadRequest as e:
            self._error(400, str(e))
            return
        if drop:  # computed, then lost in transit: the client sees a closed connection
            self.close_connection = True
            return
        self._send(200, answer)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})

    def _send(self, status: int, obj: dict) -> None:
        data = json.dumps(obj).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):
        if self.server.engine.verbose:
            super().log_message(format, *args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m draftopd.data.engine_server",
                                description="Serve a target over an OpenAI-compatible API on 127.0.0.1 "
                                            "(greedy /v1/completions with token-id prompts).")
    p.add_argument("--target", default="smollm2-135m", help="HF id, local path or embedded alias (default %(default)s)")
    p.add_argument("--port", type=int, default=8011, help="port on 127.0.0.1 (default %(default)s)")
    p.add_argument("--name", default=None, help="served model id (default: the --target spec)")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16 (default %(default)s)")
    p.add_argument("--drop-every", type=int, default=0, help="fault injection: drop every Nth completion")
    p.add_argument("--verbose", action="store_true", help="log every request")
    args = p.parse_args(argv)
    from draftopd.model.target import load_target

    try:
        target = load_target(args.target, dtype=args.dtype)
    except DraftOPDError as e:
        print(f"engine_server: error: {e}", file=sys.stderr)
        return 2
    server = EngineServer(target.model, target.tokenizer, args.name or args.target, port=args.port,
                          drop_every=args.drop_every, verbose=args.verbose)
    print(f"serving {server.name!r} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
