"""Bounds on what a client's values may cost the server: request ids are refused past a
length, and any client value a message or log line repeats is shown truncated.

A status message travels in the response trailers, which clients refuse past their header
limit (8 KiB by default in gRPC): an error that echoed a long value whole would reach the
client as RESOURCE_EXHAUSTED instead of its own code.
"""

from __future__ import annotations

from collections.abc import Iterable

from guard.errors import InvalidInputError

MAX_REQUEST_ID_CHARS = 256
"""Longest request id a client may send (it is logged with every verdict of the request)."""

SHOWN_CHARS = 64
"""How much of a client's value an error message or log line repeats."""

MAX_MESSAGE_CHARS = 1024
"""Longest status message sent back (a last bound, beyond the truncation of each value)."""


def shown(value: object, limit: int = SHOWN_CHARS, *, quoted: bool = True) -> str:
    """``value`` for a message (a string quoted, unless not ``quoted``): whole when short,
    else its first ``limit`` characters with its length, e.g. ``'abc…' (9000 characters)``."""
    text = value if isinstance(value, str) else str(value)
    quote = quoted and isinstance(value, str)
    if len(text) <= limit:
        return repr(text) if quote else text
    if not quote:
        return f"{text[:limit]}… ({len(text)} characters)"
    head = repr(text[:limit])
    return f"{head[:-1]}…{head[-1]} ({len(text)} characters)"


def shown_list(values: Iterable[object], most: int = 5, limit: int = SHOWN_CHARS) -> str:
    """Up to ``most`` values, each ``shown``, and how many more there are."""
    values = list(values)
    parts = [shown(v, limit) for v in values[:most]]
    if len(values) > most:
        parts.append(f"and {len(values) - most} more")
    return ", ".join(parts)


def bounded_message(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    """A status message cut to ``limit`` characters (marked as cut)."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


def check_request_id(request_id: str) -> str:
    """``request_id`` as given; ``InvalidInputError`` past ``MAX_REQUEST_ID_CHARS``."""
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInputError(
            f"the request id is {len(request_id)} characters; ids may have at most "
            f"{MAX_REQUEST_ID_CHARS} characters"
        )
    return request_id
