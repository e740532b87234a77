"""Owns the checks every standalone server command makes before it listens: port and token;
and how a process the orchestrator started (a local worker, the embedded sim's process) dies
with it (--parent-pid)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import urllib.parse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bus.tokens import TokenError, is_loopback, load_token

if TYPE_CHECKING:
    import trio


class ServeArgsError(ValueError):
    """The command line or token configuration cannot serve (the user's to fix; exit 2)."""


def serving_token(args: argparse.Namespace, *, risk: str) -> str | None:
    """The token a server on `args.host:args.port` uses, or None for an open loopback server.

    Raises ServeArgsError when the port is not a TCP port, the token file is unusable, or no
    token is configured for a host other machines can reach (`risk` says what a stranger
    could then do).
    """
    if not 0 <= args.port <= 65535:
        raise ServeArgsError(f"--port {args.port} is not a TCP port (0-65535)")
    try:
        token = load_token(args.token_file)
    except TokenError as exc:
        raise ServeArgsError(str(exc)) from None
    if token is None and not is_loopback(args.host):
        raise ServeArgsError(
            f"refusing to serve on {args.host!r} without a token: anyone who can reach it "
            f"could {risk}. Set SWITCHBOARD_TOKEN or pass --token-file, or listen on 127.0.0.1.")
    return token


def print_error(exc: Exception) -> None:
    print(f"error: {exc}", file=sys.stderr)


class ListenError(Exception):
    """A server could not listen (a port in use, an address that cannot be bound): the
    environment's problem (exit 3), said in one line."""


async def start_listening(nursery: Any, fn: Any, config: Any, *, what: str,
                          error: type[ListenError] = ListenError) -> Any:
    """nursery.start(fn, config), with a failure to listen raised as one `error`: trio hands
    it over wrapped in exception groups, which `except OSError` never matches."""
    try:
        return await nursery.start(fn, config)
    except OSError as exc:
        raise error(f"cannot start {what}: {exc.strerror or exc}") from exc
    except BaseExceptionGroup as eg:
        match, rest = eg.split(OSError)
        if rest is not None or match is None:
            raise
        first: BaseException = match
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise error(f"cannot start {what}: "
                    f"{getattr(first, 'strerror', None) or first}") from eg


def is_wildcard(host: str) -> bool:
    """True for a host that means every interface (nobody's address to dial)."""
    return host in ("0.0.0.0", "::", "")


def with_host(url: str, host: str) -> str:
    """`url` with its host replaced (the port kept)."""
    parts = urllib.parse.urlsplit(url)
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, parts.query,
                                    parts.fragment))


def listening_line(what: str, url: str, host: str) -> str:
    """The line a standalone server prints once it listens: the URL to dial from this machine
    first (scripts read that word), and for a wildcard host what other machines dial instead,
    since "0.0.0.0" is nobody's address."""
    if not is_wildcard(host):
        return f"{what} listening on {url}"
    local = with_host(url, "::1" if host == "::" else "127.0.0.1")
    remote = with_host(url, socket.gethostname())
    return (f"{what} listening on {local} (on every interface: from other machines dial this "
            f"machine's name or address, e.g. {remote})")


PARENT_POLL_S = 0.5  # how often a process started with --parent-pid checks its parent


def parent_pid_error(pid: int | None, what: str) -> str | None:
    """Why `--parent-pid pid` is wrong for this process (None: it is fine, or not given).

    A pid that is not our parent would make the process exit at once, as if its orchestrator
    had died (and race its own signal handler to do it): a usage error, said plainly."""
    if pid is None or pid == os.getppid():
        return None
    return (f"--parent-pid {pid} is not this {what}'s parent (that is {os.getppid()}); the "
            "flag is for the orchestrator that starts it: leave it out")


async def stop_with_parent(pid: int) -> None:
    """Return never; once process `pid` is no longer our parent (it exited, even by SIGKILL),
    send ourselves SIGTERM: the same clean stop as a signal from outside."""
    import trio

    while os.getppid() == pid:  # noqa: ASYNC110 - no event says "reparented"
        await trio.sleep(PARENT_POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)
    await trio.sleep_forever()


async def read_lines(stream: trio.abc.ReceiveStream, handle: Callable[[list[bytes]], None], *,
                     max_line: int) -> None:
    """Hand the lines of a child's pipe (without their newline) to `handle`, a batch per read,
    until it closes. Output with no newline is handed over in pieces of `max_line` bytes once
    it passes that, so a child writing without newlines cannot grow our memory."""
    buf = b""
    async for chunk in stream:
        buf += bytes(chunk)
        *lines, buf = buf.split(b"\n")
        while len(buf) > max_line:
            lines.append(buf[:max_line])
            buf = buf[max_line:]
        if lines:
            handle(lines)
    if buf:
        handle([buf])
