"""The sidecar's HTTP servers: the metrics port (``/metrics``, and ``/flags`` unless the page
has a port of its own) and, with ``ui_port``, the page's port, over TLS when the sidecar has
TLS. Threaded, quiet (no line per request), closed with the sidecar."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from guard.errors import ConfigError
from guard.transport.http.flags_page import is_page_path, moved_page

log = logging.getLogger(__name__)

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# A client that sends nothing (or never finishes a TLS handshake) is dropped after this long.
_CONNECTION_TIMEOUT_SECONDS = 30.0


class _Handler(WSGIRequestHandler):
    timeout = _CONNECTION_TIMEOUT_SECONDS

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):  # in this connection's own thread
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass  # no line per request


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("HTTP connection from %s failed", client_address, exc_info=True)


class HttpServer:
    """``app`` on ``host``:``port`` (0: any free port) in a background thread; TLS with
    ``context``. ``OSError`` when the port cannot be bound."""

    def __init__(
        self, host: str, port: int, app: WsgiApp, *, context: ssl.SSLContext | None = None
    ) -> None:
        family, address = _family(host, port)
        server_class = type("GuardHttpServer", (_Server,), {"address_family": family})
        self._httpd = make_server(address, port, app, server_class, handler_class=_Handler)
        if context is not None:  # each connection's handshake runs in its own thread
            self._httpd.socket = context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port: int = self._httpd.server_port
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name=f"guard-http-{self.port}", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and address to bind ``host`` with (IPv6 hosts need AF_INET6)."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = found[0]
    return family, address[0]


def metrics_app(registry: CollectorRegistry, page: WsgiApp | None) -> WsgiApp:
    """``/metrics`` (any path, as prometheus-client serves it) and the /flags routes: the
    ``page``, or (None: it has a port of its own) a note saying so."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if is_page_path(environ.get("PATH_INFO", "")):
            if page is not None:
                return page(environ, start_response)
            return moved_page(environ, start_response)
        return metrics(environ, start_response)

    return app


def page_app(page: WsgiApp) -> WsgiApp:
    """The page's own port: the /flags routes, with ``/`` leading to ``/flags``."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "") in ("", "/"):
            start_response("302 Found", [("Location", "flags"), ("Content-Length", "0")])
            return [b""]
        return page(environ, start_response)

    return app


def tls_context(cert: Path, key: Path, client_ca: Path | None) -> ssl.SSLContext:
    """A server context from the sidecar's PEM files (TLS 1.2 or later); with ``client_ca``
    clients must show a certificate it signed, as on the gRPC port."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca is not None:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot use {cert} and {key} for the /flags page: {exc}") from exc
    return context
