"""Owns the checks every standalone server command makes before it listens: port and token."""

from __future__ import annotations

import argparse
import socket
import sys
import urllib.parse
from typing import Any

from bus.tokens import TokenError, is_loopback, load_token


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
