"""Serve a recipe's champion on this machine and ask it one question: the end of `make demo`.

    draftsmith serve --recipe tiny-eagle3                 # a local head node if none answers, deploy, one question
    draftsmith serve --recipe tiny-eagle3 --prompt "Convert 7 km to m."

Starts a Ray head node (`ray start --head`, dashboard on 127.0.0.1:8265) unless one answers there, deploys the
recipe's registry champion with `draftsmith deploy`, sends one chat request through the OpenAI client, and prints
the answer, the reference answer where the base has one (the embedded base's held-out conversations, or a
`--prompt` in its generator's phrasings), and the acceptance length the endpoint measured. The endpoint keeps running: `draftsmith chat` talks to it, `ray stop` stops
it (and every other Ray on this machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from draftsmith.recipe.schema import Recipe

DASHBOARD = "http://127.0.0.1:8265"
ENDPOINT = "http://127.0.0.1:8000"  # serve/config.yaml's http_options
ACCEPTANCE_METRIC = "draftsmith_spec_decode_acceptance_length{"
FALLBACK_PROMPT = "Summarize speculative decoding in one sentence."


@dataclass(frozen=True)
class Question:
    prompt: str
    reference: str | None  # the answer the base was trained to give, where it has one


class ServeError(ValueError):
    """The endpoint could not be started or asked; the message says what to do."""


def parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="tiny-eagle3", help="the recipe whose registry champion is served")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a recipe override, as the pipeline run had it (e.g. output_dir=/mnt/runs)")
    p.add_argument("--prompt", help="the question (default: the first of the base's held-out conversations)")
    p.add_argument("--address", default=DASHBOARD, help="the head node's dashboard (started here if none answers)")
    p.add_argument("--url", default=ENDPOINT, help="where the endpoint answers (serve/config.yaml's http_options)")
    p.add_argument("--max-tokens", type=int, default=96)
    return p


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def ensure_head_node(address: str, timeout_s: float = 180) -> bool:
    """A Ray head node whose dashboard answers at `address`: the running one, else one started here (returns True
    when it started one). Local addresses only; a remote cluster is the user's to start."""
    if answers(f"{address}/api/version"):
        return False
    host, _, port = address.removeprefix("http://").partition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise ServeError(f"no Ray dashboard answers at {address}; start that cluster, or leave --address unset")
    ray = shutil.which("ray") or str(Path(sys.executable).parent / "ray")
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}  # as main() sets it
    # More logical CPUs than cores: the ingress, the stats board and the engine replica each hold a CPU.
    subprocess.run([ray, "start", "--head", "--num-cpus", "8", "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", port or "8265", "--include-dashboard", "true"],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    deadline = time.time() + timeout_s
    while not answers(f"{address}/api/version"):
        if time.time() > deadline:
            raise ServeError(f"the head node started here does not answer at {address} after {timeout_s:.0f} s; "
                             "see /tmp/ray/session_latest/logs")
        time.sleep(1)
    return True


def default_question(recipe: Recipe) -> Question:
    """The first held-out conversation's first turn of the recipe's embedded base (the base was judged on these,
    so it has a reference answer), read from the last pipeline run's summary; else a general question."""
    from draftsmith.pipeline.summary import SUMMARY_JSON

    summary = recipe.run_dir() / SUMMARY_JSON
    if recipe.base.embedded is not None and summary.is_file():
        from draftsmith.embedded.build import heldout_conversations

        model_dir = json.loads(summary.read_text())["base"]["outputs"]["model_dir"]
        for record in heldout_conversations(Path(model_dir)):
            messages = record["messages"]
            if len(messages) >= 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
                return Question(messages[0]["content"], messages[1]["content"])
    return Question(FALLBACK_PROMPT, None)


def prompt_question(recipe: Recipe, prompt: str) -> Question:
    """The user's question, with the embedded base's reference answer where it is one of its generator's phrasings."""
    if recipe.base.embedded is None:
        return Question(prompt, None)
    from draftsmith.embedded.conversations import taught_turn

    turn = taught_turn(prompt)
    return Question(prompt, turn.assistant if turn else None)


def acceptance_length(url: str, timeout_s: float = 20) -> float | None:
    """The endpoint's acceptance length (mean tokens per verification step), once its engines have reported."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
                text = response.read().decode()
        except OSError:  # the answer is in; an unreadable /metrics only leaves the figure out
            return None
        lines = [line for line in text.splitlines() if line.startswith(ACCEPTANCE_METRIC)]
        if lines:
            return float(lines[0].rsplit(" ", 1)[1])
        time.sleep(1)  # engines report every 2 s
    return None


def ask(url: str, question: Question, max_tokens: int, out: TextIO, api_key: str | None = None) -> str:
    """One chat request through the OpenAI client; prints the question, the answer, the reference and the
    acceptance length, and returns the answer."""
    import openai  # a vLLM dependency, so installed wherever an engine is

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=api_key or os.environ.get("DRAFTSMITH_API_KEY") or "none",
                           max_retries=1)
    try:
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question.prompt}],
                                               max_tokens=max_tokens, temperature=0)
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        raise ServeError(f"the endpoint at {url} did not answer the question: {exc}") from None
    answer = reply.choices[0].message.content or ""
    out.write(f"\n{model} at {url}/v1\n  asked      {question.prompt}\n  answered   {answer.strip()}\n")
    if question.reference is not None:
        verdict = "exact match" if answer.strip() == question.reference.strip() else "differs"
        out.write(f"  reference  {question.reference.strip()}  ({verdict})\n")
    length = acceptance_length(url)
    out.write(f"  acceptance {length:.2f} tokens per verification step\n" if length is not None else
              f"  acceptance not reported (see {url}/metrics)\n")
    return answer


def main(argv: list[str] | None = None, prog: str | None = None, out: TextIO | None = None) -> int:
    args = parser(prog).parse_args(argv)
    out = out or sys.stdout
    from draftsmith import tracking
    from draftsmith.recipe.loader import load_recipe
    from jobs.deploy import main as deploy

    recipe = load_recipe(args.recipe, args.overrides)  # a bad recipe fails before anything starts
    tracking_uri = tracking.resolve_tracking_uri(recipe.tracking, recipe.output_dir)  # where the pipeline registered
    # The same on the head node and on the deploy's requests (Ray 2.60 turns token auth on by itself otherwise).
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    started = ensure_head_node(args.address)
    out.write(f"{'started a' if started else 'using the'} Ray head node at {args.address}\n")
    if deploy(["--recipe", args.recipe, "--address", args.address, "--tracking-uri", tracking_uri],
              prog="draftsmith deploy") != 0:
        return 2
    question = prompt_question(recipe, args.prompt) if args.prompt else default_question(recipe)
    ask(args.url, question, args.max_tokens, out)
    out.write(f"\nthe endpoint keeps running:\n  draftsmith chat                 # talk to it\n"
              f"  curl {args.url}/v1/models\n  ray stop                        # stop it (and every Ray on this "
              "machine)\n")
    return 0
