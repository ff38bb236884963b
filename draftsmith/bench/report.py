"""The benchmark results table: sections of rows, the machine they ran on, written as markdown and JSON."""

from __future__ import annotations

import json
import os
import platform as std_platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from draftsmith.provenance import git_commit, package_versions


def environment() -> dict[str, Any]:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": std_platform.python_version(),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


@dataclass
class Section:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, *values: Any) -> None:
        assert len(values) == len(self.columns), (values, self.columns)
        self.rows.append(list(values))


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def to_markdown(sections: list[Section], env: dict[str, Any], command: str) -> str:
    lines = ["# draftsmith benchmark results", "",
             f"Produced by `{command}` on {env['date']} (commit `{env['git_commit'][:12]}`).", "",
             f"Machine: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB, Python {env['python']}; "
             + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ".", ""]
    for section in sections:
        lines += [f"## {section.title}", "", "| " + " | ".join(section.columns) + " |",
                  "|" + "---|" * len(section.columns)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in section.rows]
        lines += [""] + [f"- {note}" for note in section.notes] + ([""] if section.notes else [])
    return "\n".join(lines)


def write_results(sections: list[Section], out_dir: Path, command: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out_dir / "results.json").write_text(json.dumps(
        {"environment": env, "command": command,
         "sections": [{"title": s.title, "columns": s.columns, "rows": s.rows, "notes": s.notes} for s in sections]},
        indent=2, default=str))
    markdown = out_dir / "results.md"
    markdown.write_text(to_markdown(sections, env, command))
    return markdown
