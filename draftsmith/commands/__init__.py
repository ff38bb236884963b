"""The `draftsmith` command: a subcommand per job in jobs/ (the same `main`, given the arguments), plus status, chat
and ui. Nothing heavy is imported before a subcommand is chosen and its arguments parsed, so `--help` is instant."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import textwrap
from functools import partial
from typing import NoReturn

from draftsmith.cli import run_main

# Subcommand -> the module whose `main(argv, prog)` runs it, in the order `draftsmith --help` lists them.
STAGE_COMMANDS = {name: f"jobs.{name}" for name in (
    "pipeline", "synthesize", "convert", "train", "quantize", "export", "evaluate", "register", "bench")}
RUN_COMMANDS = {
    "status": "draftsmith.commands.status",
    "deploy": "jobs.deploy",
    "serve": "draftsmith.commands.serve",
    "chat": "draftsmith.commands.chat",
    "ui": "draftsmith.commands.ui",
}
COMMANDS = {**STAGE_COMMANDS, **RUN_COMMANDS}

EXAMPLE = """examples:
  draftsmith pipeline --recipe tiny-eagle3          # every stage on the embedded default (finished ones skipped)
  draftsmith status --recipe tiny-eagle3            # what has run, its figures and folders, the registry
  draftsmith deploy --recipe tiny-eagle3            # serve the champion on a running Ray (ray start --head)
  draftsmith serve --recipe tiny-eagle3             # ... on this machine (a head node if none), and ask it once
  draftsmith chat                                   # talk to the served endpoint"""


def summary_sentence(module: str) -> str:
    """The first paragraph of a module's docstring (its one-sentence summary), read from its source without importing
    it: a job's imports are the job's business."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin is not None, f"{module} is not importable"
    with open(spec.origin, encoding="utf-8") as source:
        doc = ast.get_docstring(ast.parse(source.read())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def usage() -> str:
    def block(title: str, commands: dict[str, str]) -> list[str]:
        return [f"{title}:"] + [textwrap.fill(summary_sentence(module), 116, initial_indent=f"  {name:<11} ",
                                              subsequent_indent=" " * 14) for name, module in commands.items()]

    return "\n".join([
        "usage: draftsmith COMMAND [--help] [ARGS]",
        "",
        "Train, quantize, export, evaluate, register and serve speculative-decoding drafts on Ray.",
        "",
        *block("stages (each runs the stages it needs first; finished ones are skipped)", STAGE_COMMANDS),
        "",
        *block("around a run", RUN_COMMANDS),
        "",
        EXAMPLE,
    ])


def main(argv: list[str] | None = None) -> NoReturn:
    """The console script: `draftsmith COMMAND ARGS` runs COMMAND's `main(ARGS)` like `python -m jobs.COMMAND`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        sys.exit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"draftsmith: unknown command {name!r}; commands are {', '.join(COMMANDS)} "
              "(`draftsmith --help` says what each does)", file=sys.stderr)
        sys.exit(2)
    module = importlib.import_module(COMMANDS[name])
    run_main(partial(module.main, rest, f"draftsmith {name}"))
