"""The sidecar process: gRPC server (inference protocol, guard service, health, reflection)
and the Prometheus endpoint, with a graceful stop."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from guard.errors import ConfigError
from guard.service.data_plane import DataPlane
from guard.service.guarded_model import GuardedModel, load_guarded_model
from guard.service.metrics import GuardMetrics
from guard.service.settings import ServeSettings
from guard.transport.grpc.generated.guard.v1 import guard_pb2, guard_pb2_grpc
from guard.transport.grpc.generated.inference import grpc_predict_v2_pb2, grpc_predict_v2_pb2_grpc
from guard.transport.grpc.guard_service import GuardServicer
from guard.transport.grpc.inference import InferenceServicer
from guard.transport.grpc.tls import check_server_files, read_pem
from guard.transport.http.flags_page import FlagsPage
from guard.transport.http.server import HttpServer, metrics_app, page_app, tls_context

log = logging.getLogger(__name__)

INFERENCE_SERVICE = grpc_predict_v2_pb2.DESCRIPTOR.services_by_name[
    "GRPCInferenceService"
].full_name
GUARD_SERVICE = guard_pb2.DESCRIPTOR.services_by_name["GuardService"].full_name
# Threads beyond the request limit, so that health checks and metadata calls (and prompt
# RESOURCE_EXHAUSTED answers) still get through when every request slot is taken.
_SPARE_THREADS = 8


class Sidecar:
    """Loads the model, binds both ports on ``start``, drains on ``stop``."""

    def __init__(
        self, settings: ServeSettings, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.registry = registry or CollectorRegistry()
        self.metrics = GuardMetrics(self.registry)
        model = load_guarded_model(
            settings, on_model_call=self.metrics.model_call_counter(settings.served_name)
        )
        self.plane = DataPlane([model], settings, self.metrics)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self._draining = threading.Event()
        self._server: grpc.Server | None = None
        self._metrics_server: HttpServer | None = None
        self._ui_server: HttpServer | None = None
        self.port = 0
        self.metrics_port = 0
        self.ui_port = 0  # the /flags page's own port (0: on the metrics port)

    @property
    def models(self) -> list[GuardedModel]:
        return self.plane.models

    def start(self) -> None:
        s = self.settings
        threads = s.max_concurrency + _SPARE_THREADS
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="guard-rpc"),
            options=[
                ("grpc.max_receive_message_length", s.max_message_bytes),
                ("grpc.max_send_message_length", s.max_message_bytes),
                ("grpc.so_reuseport", 0),  # a port in use is an error, not a shared port
            ],
            maximum_concurrent_rpcs=threads,
        )
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
            InferenceServicer(self.plane, ready=lambda: not self._draining.is_set()), server
        )
        guard_pb2_grpc.add_GuardServiceServicer_to_server(GuardServicer(self.plane), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (INFERENCE_SERVICE, GUARD_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{_host(s.host)}:{s.port}"
        try:
            if s.tls_cert is not None and s.tls_key is not None:
                self.port = server.add_secure_port(address, _credentials(s))
            else:
                self.port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc}") from exc
        if self.port == 0:
            raise ConfigError(f"cannot listen on {address} (in use, or not a local address)")
        page = FlagsPage(self.plane.flags)
        try:
            self._metrics_server = HttpServer(
                s.host,
                s.metrics_port,
                metrics_app(self.registry, page if s.ui_port is None else None),
            )
        except OSError as exc:
            server.stop(None)
            raise ConfigError(
                f"cannot serve metrics on {s.host}:{s.metrics_port}: {exc.strerror or exc}"
            ) from exc
        self.metrics_port = self._metrics_server.port
        if s.ui_port is not None:
            self._serve_page(server, page)
        server.start()
        self._server = server
        for service in ("", INFERENCE_SERVICE, GUARD_SERVICE):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving %s on %s:%d (metrics on :%d/metrics), provider %s, mode %s",
            ", ".join(m.name for m in self.models),
            s.host,
            self.port,
            self.metrics_port,
            self.models[0].classifier.provider,
            s.mode,
        )
        if self.plane.flags is not None:
            scheme = "https" if self._ui_server is not None and s.tls_cert else "http"
            log.info(
                "keeping the last %d flagged predictions (at most %.1f MiB) on %s://%s:%d/flags",
                s.keep_flagged,
                self.plane.flags.bound_bytes / (1 << 20),
                scheme,
                s.host,
                self.ui_port or self.metrics_port,
            )

    def _serve_page(self, server: grpc.Server, page: FlagsPage) -> None:
        """The /flags page on its own port (ui_port), over TLS when the sidecar has TLS."""
        s = self.settings
        assert s.ui_port is not None and self._metrics_server is not None
        context = None
        if s.tls_cert is not None and s.tls_key is not None:
            context = tls_context(s.tls_cert, s.tls_key, s.tls_client_ca)
        try:
            self._ui_server = HttpServer(s.host, s.ui_port, page_app(page), context=context)
        except OSError as exc:
            server.stop(None)
            self._metrics_server.close()
            raise ConfigError(
                f"cannot serve the /flags page on {s.host}:{s.ui_port}: {exc.strerror or exc}"
            ) from exc
        self.ui_port = self._ui_server.port

    def stop(self, grace: float | None = None) -> None:
        """Health to NOT_SERVING, refuse new requests, let in-flight ones finish within
        ``grace`` seconds, finish queued background checks, close the metrics port."""
        grace = self.settings.grace_seconds if grace is None else grace
        ends = time.monotonic() + grace  # one grace period for requests and queues together
        self._draining.set()
        self.health.enter_graceful_shutdown()
        if self._server is not None:
            self._server.stop(grace).wait()
        self.plane.close(timeout=max(0.0, ends - time.monotonic()))
        for http_server in (self._metrics_server, self._ui_server):
            if http_server is not None:
                http_server.close()
        log.info("stopped")

    def wait(self) -> None:
        if self._server is not None:
            self._server.wait_for_termination()


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _credentials(s: ServeSettings) -> grpc.ServerCredentials:
    assert s.tls_cert is not None and s.tls_key is not None
    check_server_files(s.tls_cert, s.tls_key, s.tls_client_ca)  # named here, not as "bind"
    pair = (read_pem(s.tls_key, "the TLS key"), read_pem(s.tls_cert, "the TLS certificate"))
    client_ca = read_pem(s.tls_client_ca, "the client CA bundle") if s.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
