"""A small real OpenAI-compatible HTTP server for tests: transformers greedy generation on loopback.

It stands in for `vllm serve` / `trtllm-serve` where their start-up would dominate a test, and can misbehave
on purpose: a user turn containing FAIL500 always gets HTTP 500, one containing FLAKY gets 429 the first time.
Every request body is recorded, so tests can check what the client sent. `stream: true` is answered as
server-sent events, a chunk per word. Without a model folder it answers with `reply(messages)` instead of a model
(no torch imported), for tests of clients rather than of generation.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class OpenAITestServer:
    def __init__(self, model_dir: Path | None, api_key: str | None = None,
                 reply: Callable[[list[dict]], str] | None = None, model_id: str = "tiny-base"):
        assert (model_dir is None) != (reply is None), "a model folder or a reply function, not both"
        self.reply, self.model_id = reply, model_id
        if model_dir is not None:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.api_key, self.requests, self.lock, self.flaky_seen = api_key, [], threading.Lock(), set()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()

    def complete(self, messages: list[dict], max_tokens: int) -> tuple[str, int, str]:
        if self.reply is not None:
            text = self.reply(messages)
            return text, len(text.split()), "stop"
        import torch

        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        with self.lock, torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                      eos_token_id=self.tokenizer.eos_token_id,
                                      pad_token_id=self.tokenizer.pad_token_id)[0, enc["input_ids"].shape[1]:].tolist()
        stopped = self.tokenizer.eos_token_id in out
        if stopped:
            out = out[: out.index(self.tokenizer.eos_token_id) + 1]
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return text, len(out), "stop" if stopped else "length"

    def _handler(server):  # noqa: N805 - the handler class closes over the server object
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorised(self) -> bool:
                if server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                    return False
                return True

            def do_GET(self):
                if self._authorised():
                    self._send(200, {"object": "list", "data": [{"id": server.model_id, "object": "model"}]})

            def _stream(self, model: str, text: str, reason: str) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for piece in [*re.findall(r"\S+\s*", text), None]:
                    delta = {"role": "assistant", "content": piece} if piece is not None else {}
                    chunk = {"id": "x", "object": "chat.completion.chunk", "model": model,
                             "choices": [{"index": 0, "delta": delta, "finish_reason": None if piece else reason}]}
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.close_connection = True

            def do_POST(self):
                if not self._authorised():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                last = body["messages"][-1]["content"]
                if "FAIL500" in last:
                    return self._send(500, {"error": {"message": "injected failure"}})
                if "FLAKY" in last and last not in server.flaky_seen:
                    server.flaky_seen.add(last)
                    return self._send(429, {"error": {"message": "slow down"}})
                text, tokens, reason = server.complete(body["messages"], body.get("max_tokens", 64))
                if body.get("stream"):
                    return self._stream(body["model"], text, reason)
                self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": reason,
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"completion_tokens": tokens}})

        return Handler
