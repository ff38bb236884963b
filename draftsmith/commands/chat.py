"""Chat with a served OpenAI-compatible endpoint, streaming the answer: one prompt, or a conversation without one.

    draftsmith chat 'Spell the word "kitten".'                             # the embedded demo base's phrasing
    draftsmith chat --url http://HEAD:8000/v1 --model tiny-eagle3-draft     # a conversation; empty line or EOF ends

The endpoint is this project's Serve app (`draftsmith deploy`), or any OpenAI-compatible server (vllm serve,
trtllm-serve). The bearer key, if the endpoint wants one, is read from the environment variable --api-key-env.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from openai import OpenAI

DEFAULT_URL = "http://127.0.0.1:8000/v1"  # serve/config.yaml's http_options


class ChatError(ValueError):
    """The endpoint cannot be used as asked; the message says which URL and what to do."""


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt", nargs="*", help="the message; none starts a conversation on the terminal")
    p.add_argument("--url", default=os.environ.get("DRAFTSMITH_URL", DEFAULT_URL),
                   help=f"the endpoint's OpenAI base URL (default $DRAFTSMITH_URL, else {DEFAULT_URL})")
    p.add_argument("--model", help="the served model's name (default: the first the endpoint lists)")
    p.add_argument("--api-key-env", default="DRAFTSMITH_API_KEY", help="environment variable holding the bearer key")
    p.add_argument("--system", help="a system prompt")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    return p


def served_model(client: OpenAI, url: str) -> str:
    import openai

    try:
        models = [m.id for m in client.models.list()]
    except openai.APIConnectionError:
        raise ChatError(f"no endpoint answers at {url}: start one with `draftsmith deploy --recipe RECIPE`, or pass "
                        "--url") from None
    except openai.APIStatusError as exc:
        raise ChatError(f"{url} answered GET /models with HTTP {exc.status_code}: {exc.message}") from None
    if not models:
        raise ChatError(f"{url} serves no model (GET /models is empty)")
    return models[0]


def stream_answer(client: OpenAI, model: str, messages: list[dict[str, str]], args: argparse.Namespace,
                  out: TextIO) -> str:
    """Send the conversation, write the answer to `out` as it arrives, and return it."""
    import openai

    try:
        stream = client.chat.completions.create(model=model, messages=messages, stream=True,  # type: ignore[arg-type]
                                                max_tokens=args.max_tokens, temperature=args.temperature)
        pieces = []
        for chunk in stream:
            delta = chunk.choices[0].delta.content if chunk.choices else None
            if delta:
                pieces.append(delta)
                out.write(delta)
                out.flush()
    except openai.APIConnectionError:
        raise ChatError(f"the endpoint at {args.url} went away mid-answer") from None
    except openai.APIStatusError as exc:
        raise ChatError(f"{args.url} answered HTTP {exc.status_code}: {exc.message}") from None
    out.write("\n")
    return "".join(pieces)


def main(argv: list[str] | None = None, prog: str | None = None, out: TextIO | None = None,
         inp: TextIO | None = None) -> int:
    args = parser(prog).parse_args(argv)
    out, inp = out or sys.stdout, inp or sys.stdin
    from openai import OpenAI  # a vLLM dependency, so installed wherever an engine is

    # The client refuses to start without a key; an endpoint without auth ignores the placeholder.
    client = OpenAI(base_url=args.url, api_key=os.environ.get(args.api_key_env) or "none", max_retries=1)
    model = args.model or served_model(client, args.url)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt:
        messages.append({"role": "user", "content": " ".join(args.prompt)})
        stream_answer(client, model, messages, args, out)
        return 0
    interactive = inp.isatty()
    if interactive:
        out.write(f"{model} at {args.url}; an empty line or Ctrl-D ends\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = inp.readline()
        if not line.strip():
            return 0
        messages.append({"role": "user", "content": line.strip()})
        messages.append({"role": "assistant", "content": stream_answer(client, model, messages, args, out)})
