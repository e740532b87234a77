"""Owns what `orchestrator run` shows while it runs: a live line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
from typing import IO, Any


class Progress:
    """Renders run progress. TTY: one line rewritten in place; plain: a line when something changed."""

    def __init__(self, *, tty: bool, total: int, stream: IO[str]) -> None:
        self.tty = tty
        self.total = total
        self.stream = stream
        self.interval = 0.2 if tty else 2.0
        self._last = ""

    @classmethod
    def make(cls, mode: str, *, total: int, stream: IO[str] | None = None) -> Progress | None:
        out = stream if stream is not None else sys.stderr
        if mode == "none":
            return None
        tty = out.isatty() if mode == "auto" else mode == "tty"
        return cls(tty=tty, total=total, stream=out)

    @staticmethod
    def render(s: dict[str, Any]) -> str:
        # Tasks ready to run but not leased yet show apart: with no free worker, they wait.
        waiting = f", {s['waiting']} waiting for a worker" if s.get("waiting") else ""
        return (f"tasks {s['done']}/{s['total']} done, {s['running']} running{waiting}, "
                f"{s['failed']} failed | workers {s['workers']} | "
                f"{s['tokens_per_s']:.0f} model tok/s | {s['elapsed']:.1f}s")

    def note(self, text: str) -> None:
        """A line of its own, before the live progress line starts."""
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, state: dict[str, Any]) -> None:
        line = self.render(state)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            self.stream.flush()
        else:
            key = line.split(" | ")[0] + str(state["workers"])
            if key != self._last:
                self.stream.write(line + "\n")
                self.stream.flush()
                self._last = key

    def close(self, state: dict[str, Any]) -> None:
        # by now the workers were stopped: the last line says how many the run had at most
        # (`workers_peak`, the supervisor's count of them connected at once)
        peak = max(int(state["workers"]), int(state.get("workers_peak", 0)))
        line = self.render({**state, "workers": peak})
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + "\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
