"""What `orchestrator run` shows while it runs: plain lines off a terminal, one rewritten line on it."""

from __future__ import annotations

import io
from typing import Any

from orchestrator.progress import Progress


def state(done: int, running: int, workers: int, *, tok: float = 0.0, t: float = 0.0
          ) -> dict[str, Any]:
    return {"done": done, "total": 4, "running": running, "failed": 0, "workers": workers,
            "tokens_per_s": tok, "elapsed": t}


def test_plain_lines_only_when_tasks_or_workers_change_and_the_last_says_how_many_worked():
    out = io.StringIO()
    p = Progress.make("plain", total=4, stream=out)
    assert p is not None and not p.tty
    p.update(state(0, 0, 0))
    p.update(state(0, 2, 2, tok=50.0, t=0.5))
    p.update(state(0, 2, 2, tok=80.0, t=1.0))  # only the rate moved: no new line
    p.update(state(3, 1, 2, tok=90.0, t=1.5))
    # the workers were stopped before the last line; the supervisor counted 2 at most
    p.close({**state(4, 0, 0, tok=95.0, t=2.0), "workers_peak": 2})
    assert out.getvalue().splitlines() == [
        "tasks 0/4 done, 0 running, 0 failed | workers 0 | 0 model tok/s | 0.0s",
        "tasks 0/4 done, 2 running, 0 failed | workers 2 | 50 model tok/s | 0.5s",
        "tasks 3/4 done, 1 running, 0 failed | workers 2 | 90 model tok/s | 1.5s",
        "tasks 4/4 done, 0 running, 0 failed | workers 2 | 95 model tok/s | 2.0s",
    ]


def test_a_terminal_gets_one_line_rewritten_in_place_and_none_gets_nothing():
    out = io.StringIO()
    p = Progress.make("tty", total=4, stream=out)
    assert p is not None and p.tty
    p.update(state(1, 1, 1))
    p.close({**state(4, 0, 0), "workers_peak": 1})
    assert out.getvalue() == (
        "\r\x1b[2Ktasks 1/4 done, 1 running, 0 failed | workers 1 | 0 model tok/s | 0.0s"
        "\r\x1b[2Ktasks 4/4 done, 0 running, 0 failed | workers 1 | 0 model tok/s | 0.0s\n")
    assert Progress.make("none", total=4, stream=out) is None


def test_the_last_line_counts_workers_that_joined_between_two_plain_lines():
    out = io.StringIO()
    p = Progress.make("plain", total=4, stream=out)
    assert p is not None
    p.update(state(0, 0, 0))
    p.close({**state(4, 0, 0), "workers_peak": 3})  # three joined and left within 2 s
    assert out.getvalue().splitlines()[-1].split(" | ")[1] == "workers 3"


def test_tasks_waiting_for_a_worker_are_not_counted_as_running():
    out = io.StringIO()
    p = Progress.make("plain", total=4, stream=out)
    assert p is not None
    p.note("no workers yet (--workers 0): ...")
    p.update({**state(0, 0, 0), "waiting": 1})
    p.update({**state(0, 1, 1), "waiting": 0})  # a worker joined and took it
    assert out.getvalue().splitlines() == [
        "no workers yet (--workers 0): ...",
        "tasks 0/4 done, 0 running, 1 waiting for a worker, 0 failed | workers 0 | "
        "0 model tok/s | 0.0s",
        "tasks 0/4 done, 1 running, 0 failed | workers 1 | 0 model tok/s | 0.0s",
    ]
