"""Progress output: live bars on a terminal, a line every few seconds per task when the output is a log.

Decided once, in the process a person started (its standard streams tell whether someone watches), and handed to
Ray workers through their environment: a worker's streams are always files, so it cannot decide for itself.
"""

from __future__ import annotations

import os
import sys

# Seconds between two progress lines in a log: Ray Data's non-interactive progress and tqdm's redraws.
LOG_INTERVAL_S = 10

_set_here: dict[str, str] = {}


def is_terminal() -> bool:
    """Whether both standard streams are terminals. Bars go to stderr and Ray Data looks at stdout; a log on either
    side would collect every redraw."""
    return sys.stdout.isatty() and sys.stderr.isatty()


def log_progress_env() -> dict[str, str]:
    """The environment that turns redrawn bars into occasional lines, for this process and its Ray workers."""
    interval = str(LOG_INTERVAL_S)
    return {
        # tqdm reads TQDM_<ARGUMENT> when it is imported: every bar (transformers' and vLLM's weight loading,
        # DeepSpeed, ModelOpt's calibration) redraws at most once per interval instead of ten times a second.
        "TQDM_MININTERVAL": interval,
        # Ray Data inside a Ray worker otherwise draws Ray's distributed tqdm bars, which the driver prints as new
        # lines; without it a worker's Ray Data logs its progress like the driver's does.
        "RAY_TQDM": "0",
        # Ray Data's progress lines where stdout is not a terminal (its own default is also 10 s; set so the
        # interval is ours in one place).
        "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": interval,
    }


def configure() -> dict[str, str]:
    """Choose the progress output for this run; call before tqdm or Ray is imported (tqdm reads its settings at
    import). Returns what it set, which `worker_env` hands to Ray workers. A terminal keeps every library's live
    bars; an explicit setting in the environment is never overridden."""
    if is_terminal():
        return {}
    for key, value in log_progress_env().items():
        if key not in os.environ:
            os.environ[key] = value
            _set_here[key] = value
    return dict(_set_here)


def worker_env() -> dict[str, str]:
    """What `configure` set in this process, for the runtime env of the Ray workers it starts. Only keys set here,
    never ones inherited from a `ray job submit` runtime env (Ray refuses a driver that sets those again)."""
    return dict(_set_here)


# Ray Train's placement-group cleaner asks the State API whether the training controller lives, every second,
# and warns each time the answer cannot come: a local Ray started without its dashboard has no State API, so a
# training run logged the same line hundreds of times (232 of the demo's 732 log lines). There, the cluster ends
# with the job that started it, so no placement group can outlive its controller and the warning says nothing.
_UNANSWERABLE = {"ray.train.v2._internal.execution.controller.placement_group_cleaner":
                 "Failed to query Ray Train Controller actor state"}


class _DropMessage:
    def __init__(self, prefix: str):
        self.prefix = prefix

    def filter(self, record) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_local_workers() -> None:
    """`worker_process_setup_hook` of draftsmith's own local Ray (cluster.py): drop the warnings above, and only
    those, in every worker process."""
    import logging

    for name, prefix in _UNANSWERABLE.items():
        logging.getLogger(name).addFilter(_DropMessage(prefix))
