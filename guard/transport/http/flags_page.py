"""The /flags page: the sidecar's kept flagged predictions (guard.service.flag_store), as a
WSGI app.

Routes (GET or HEAD):

- ``/flags``: the items newest first as a gallery (input, responsibility map, MPS overlay, the
  figures, the reason), reloading itself every ``REFRESH_SECONDS``; query parameters
  ``reason``, ``class`` (index or name), ``model`` filter, ``limit`` (at most ``MAX_LIMIT``)
  and ``before`` (an id: older items only) page through them.
- ``/flags/ID``: one item large with every figure and its downloads.
- ``/flags/ID.png``: the input as the model saw it; ``/flags/ID.json``: the item with its MPS
  mask and responsibility map (the two files ``flagged_dir`` holds per item).
- ``/flags.json``: what ``/flags`` shows (same filters), for scripts.

Without ``keep_flagged`` every route says how to turn it on. Pages are self-contained (no
script at all: a Content-Security-Policy forbids any), every value in them escaped, and none
is cached by browsers or proxies (the inputs may be sensitive).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from guard.gallery import (
    Card,
    card_html,
    escaped,
    evidence_text,
    explanation_panels,
    gallery_html,
    number,
    page_html,
)
from guard.service.flag_store import FlaggedItem, FlagStore

REFRESH_SECONDS = 10
DEFAULT_LIMIT = 60
MAX_LIMIT = 500

_ITEM = re.compile(r"^/flags/(\d{1,18})(\.png|\.json)?$")
_SECURITY_HEADERS = [
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; img-src data: 'self'; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
]
OFF_MESSAGE = (
    "No flagged predictions are kept: this sidecar runs without --keep-flagged (off by "
    "default, since model inputs may be sensitive). Start guard serve with --keep-flagged N "
    "(or GUARD_KEEP_FLAGGED=N) to keep the last N flagged predictions in memory, each with its "
    "input, MPS, responsibility map and figures, and show them here; add --flagged-dir DIR to "
    "also write each one as PNG + JSON."
)

StartResponse = Callable[..., Any]
Environ = dict[str, Any]


def is_page_path(path: str) -> bool:
    """Whether a request path is one of the page's."""
    return path in ("/flags", "/flags/", "/flags.json") or path.startswith("/flags/")


def moved_page(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
    """The answer of the metrics port where the page has a port of its own."""
    text = b"The flagged-predictions page is served on the sidecar's --ui-port, not here.\n"
    return _respond(start_response, "404 Not Found", "text/plain; charset=utf-8", text)


class FlagsPage:
    """The /flags routes over a ``FlagStore`` (None: the sidecar keeps no flagged items)."""

    def __init__(
        self,
        store: FlagStore | None,
        *,
        refresh_seconds: int = REFRESH_SECONDS,
    ) -> None:
        self.store = store
        self.refresh_seconds = refresh_seconds

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in ("GET", "HEAD"):
            return _respond(
                start_response,
                "405 Method Not Allowed",
                "text/plain; charset=utf-8",
                b"only GET and HEAD\n",
                [("Allow", "GET, HEAD")],
            )
        path = environ.get("PATH_INFO", "")
        query = urllib.parse.parse_qs(environ.get("QUERY_STRING", ""), max_num_fields=20)
        status, kind, body, extra = self._route(path, {k: v[-1] for k, v in query.items()})
        if method == "HEAD":
            extra = [*extra, ("Content-Length", str(len(body)))]
            body = b""
        return _respond(start_response, status, kind, body, extra)

    # -- routing ------------------------------------------------------------------------------

    def _route(
        self, path: str, query: dict[str, str]
    ) -> tuple[str, str, bytes, list[tuple[str, str]]]:
        html_kind, json_kind = "text/html; charset=utf-8", "application/json"
        if path == "/flags/":  # relative links resolve from /flags
            return "301 Moved Permanently", html_kind, b"", [("Location", "../flags")]
        if path == "/flags":
            return "200 OK", html_kind, self.gallery(query).encode(), []
        if path == "/flags.json":
            return "200 OK", json_kind, json.dumps(self.listing(query), indent=1).encode(), []
        match = _ITEM.match(path)
        found = self.store.get(int(match[1])) if match and self.store is not None else None
        if found is None:
            return "404 Not Found", html_kind, self.missing(path).encode(), []
        suffix = match[2] if match else None
        if suffix == ".png":
            return "200 OK", "image/png", found.input_png(), [_attachment(found, "png")]
        if suffix == ".json":
            bundle = {**found.bundle(), "png": f"{found.id}.png"}
            return "200 OK", json_kind, json.dumps(bundle).encode(), [_attachment(found, "json")]
        return "200 OK", html_kind, self.item_page(found).encode(), []

    # -- pages --------------------------------------------------------------------------------

    def gallery(self, query: dict[str, str]) -> str:
        """The /flags page."""
        if self.store is None:
            return page_html(
                "Flagged predictions",
                f'<p class="empty">{escaped(OFF_MESSAGE)}</p>',
                subheading="Not enabled on this sidecar.",
            )
        store = self.store
        everything = store.items()
        shown, older = self._selected(query)
        reason, predicted = query.get("reason"), query.get("class")
        filters = ", ".join(
            f"{name} {value}"
            for name, value in (
                ("reason", reason),
                ("class", predicted),
                ("model", query.get("model")),
            )
            if value
        )
        subheading = (
            f"{len(everything)} kept of the last {store.capacity} flagged predictions "
            f"(memory bound {store.bound_bytes / (1 << 20):.1f} MiB"
            + (f", also written to {store.directory}" if store.directory else "")
            + f"); newest first; reloads every {self.refresh_seconds} s."
        )
        empty = (
            f"No kept flagged prediction matches {filters}."
            if filters
            else "No prediction has been flagged yet (or since the last restart)."
        )
        more = (
            f'<p class="note"><a href="{escaped(_query_link(query, before=str(older)))}">'
            "older items</a></p>"
            if older is not None
            else ""
        )
        return page_html(
            "Flagged predictions",
            gallery_html([self._card(f) for f in shown], empty=empty) + more,
            subheading=subheading,
            nav=_nav(everything, query),
            refresh_seconds=self.refresh_seconds,
        )

    def listing(self, query: dict[str, str]) -> dict[str, Any]:
        """The /flags.json document."""
        if self.store is None:
            return {"enabled": False, "message": OFF_MESSAGE, "items": []}
        shown, older = self._selected(query)
        return {
            "enabled": True,
            "capacity": self.store.capacity,
            "kept": len(self.store),
            "bound_bytes": self.store.bound_bytes,
            "item_bound_bytes": self.store.item_bound,
            "older": older,
            "items": [
                {
                    **f.record(),
                    "page": f"flags/{f.id}",
                    "png": f"flags/{f.id}.png",
                    "json": f"flags/{f.id}.json",
                }  # fmt: skip
                for f in shown
            ],
        }

    def item_page(self, flagged: FlaggedItem) -> str:
        """/flags/ID: one item large, every figure, its downloads."""
        card = self._card(flagged, every_figure=True)
        downloads = (
            '<p class="downloads">'
            f'<a href="{flagged.id}.png" download="flag-{flagged.id}.png">input (PNG)</a>'
            f'<a href="{flagged.id}.json" download="flag-{flagged.id}.json">'
            "item with MPS mask and responsibility (JSON)</a>"
            '<a href="../flags">all flagged predictions</a></p>'
        )
        return page_html(
            f"Flagged prediction #{flagged.id}",
            card_html(card, large=True) + downloads,
            subheading=f"{flagged.model}, {flagged.timestamp}",
        )

    def missing(self, path: str) -> str:
        if self.store is None:
            body = f'<p class="empty">{escaped(OFF_MESSAGE)}</p>'
        else:
            body = (
                f'<p class="empty">No kept flagged prediction at {escaped(path)}: it may have '
                f"been dropped for newer ones (the last {self.store.capacity} are kept).</p>"
            )
        return page_html("Not found", body + '<p><a href="/flags">all flagged predictions</a></p>')

    # -- parts --------------------------------------------------------------------------------

    def _selected(self, query: dict[str, str]) -> tuple[list[FlaggedItem], int | None]:
        """The items a query selects (newest first, at most its limit) and the id to page on
        from (None: nothing older)."""
        assert self.store is not None
        found = self.store.items(
            reason=query.get("reason") or None,
            predicted=query.get("class") or None,
            model=query.get("model") or None,
        )
        before = _integer(query.get("before"))
        if before is not None:
            found = [f for f in found if f.id < before]
        limit = min(MAX_LIMIT, max(1, _integer(query.get("limit")) or DEFAULT_LIMIT))
        older = found[limit - 1].id if len(found) > limit else None
        return found[:limit], older

    def _card(self, flagged: FlaggedItem, *, every_figure: bool = False) -> Card:
        name = flagged.predicted_name
        label = f"class {flagged.predicted_class}" + (
            f" “{name}”" if name and name != str(flagged.predicted_class) else ""
        )
        figures = [
            ("confidence", number(flagged.confidence)),
            ("score", number(flagged.score, 4)),
            ("p-value", number(flagged.p_value, 4)),
            ("MPS area", _percent(flagged.mps_area_fraction)),
            ("evidence", evidence_text(flagged.evidence)),
            ("time", flagged.timestamp),
            ("request", f"{flagged.request_id or '(no id)'} item {flagged.item}"),
        ]
        if every_figure:
            height, width = flagged.shape
            figures += [
                ("reason", flagged.reason),
                ("model", flagged.model),
                ("predicted class", str(flagged.predicted_class)),
                ("class name", name or "(none)"),
                ("from", "inference request" if flagged.source == "infer" else "Explain"),
                ("input", f"{width} x {height} x {flagged.pixels.shape[2]}"),
            ]
        return Card(
            title=f"#{flagged.id} {label}",
            panels=explanation_panels(flagged.pixels, flagged.mps_mask, flagged.responsibility),
            figures=figures,
            badge=flagged.reason,
            link=f"flags/{flagged.id}",
        )


def _nav(items: Sequence[FlaggedItem], query: dict[str, str]) -> str:
    """Filter links: every reason and predicted class among the kept items, with counts."""
    reasons = Counter(f.reason for f in items)
    classes = Counter(str(f.predicted_class) for f in items)
    names = {str(f.predicted_class): f.predicted_name for f in items}

    def links(key: str, counts: Counter[str], label: Callable[[str], str]) -> str:
        current = query.get(key)
        parts = [_chip("all", _query_link(query, **{key: None}), current in (None, ""))]
        for value, count in sorted(counts.items(), key=lambda kv: _order(kv[0])):
            parts.append(
                _chip(
                    f"{label(value)} ({count})",
                    _query_link(query, **{key: value}),
                    current == value,
                )
            )
        return "".join(parts)

    def class_label(value: str) -> str:
        name = names.get(value, "")
        return value if not name or name == value else f"{value} {name}"

    return (
        f'<nav><span class="label">reason</span>{links("reason", reasons, str)}'
        f' &nbsp; <span class="label">class</span>{links("class", classes, class_label)}</nav>'
    )


def _chip(text: str, href: str, on: bool) -> str:
    kind = ' class="on"' if on else ""
    return f'<a{kind} href="{escaped(href)}">{escaped(text)}</a>'


def _query_link(query: dict[str, str], **changes: str | None) -> str:
    """``?...`` with the page's filters and ``changes`` (None drops one); paging restarts."""
    merged = {k: v for k, v in query.items() if k in ("reason", "class", "model", "limit") and v}
    merged.update({k: v for k, v in changes.items() if v})
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
    return "?" + urllib.parse.urlencode(merged) if merged else "?"


def _order(value: str) -> tuple[int, int | str]:
    return (0, int(value)) if value.isdigit() else (1, value)


def _integer(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() and len(text) <= 18 else None


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.1f}% of pixels"


def _attachment(flagged: FlaggedItem, suffix: str) -> tuple[str, str]:
    return ("Content-Disposition", f'attachment; filename="flag-{flagged.id}.{suffix}"')


def _respond(
    start_response: StartResponse,
    status: str,
    kind: str,
    body: bytes,
    extra: Sequence[tuple[str, str]] = (),
) -> Iterable[bytes]:
    headers = [("Content-Type", kind), *_SECURITY_HEADERS, *extra]
    if not any(name == "Content-Length" for name, _ in headers):
        headers.append(("Content-Length", str(len(body))))
    start_response(status, headers)
    return [body]
