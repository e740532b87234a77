"""Owns where shared-secret tokens come from: `SWITCHBOARD_TOKEN` or a token file, never argv."""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV_VAR = "SWITCHBOARD_TOKEN"


class TokenError(ValueError):
    """The token configuration is unusable (your fault: fix the file or variable named)."""


def load_token(token_file: str | None, *, env: Mapping[str, str] | None = None) -> str | None:
    """Return the configured token, or None when none is configured.

    A `--token-file` wins over the environment. Raises TokenError when the file cannot be read
    or holds no token; surrounding whitespace (a trailing newline) is stripped.
    """
    environ = os.environ if env is None else env
    if token_file is not None:
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as exc:
            raise TokenError(
                f"cannot read token file {token_file!r}: {exc.strerror or exc}; "
                "pass a readable file to --token-file or set SWITCHBOARD_TOKEN"
            ) from None
        if not token:
            raise TokenError(f"token file {token_file!r} is empty: write the shared token into it")
        return token
    raw = environ.get(ENV_VAR, "")
    token = raw.strip()
    if raw and not token:  # empty means unset (VAR= cmd); blanks are a mistake to say
        raise TokenError(f"{ENV_VAR} holds only whitespace: set it to the shared token, or "
                         "unset it")
    return token or None


def is_loopback(host: str) -> bool:
    """True iff `host` names only this machine (127.0.0.0/8, ::1, localhost)."""
    h = host.strip("[]").lower()
    return h == "localhost" or h == "::1" or h.startswith("127.")
