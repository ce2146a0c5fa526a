#!/usr/bin/env python3
"""Asks the guard's gRPC health service whether it is serving: exit 0 if SERVING, else 1.

The container image's HEALTHCHECK (installed as ``guard-healthcheck``). Kubernetes can probe
gRPC health natively (deploy/k8s); this is for Docker, and for exec probes under TLS, which
Kubernetes' gRPC probes do not speak. Settings default to the guard's own environment
(GUARD_PORT, GUARD_TLS_CERT, GUARD_TLS_KEY).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guard-healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--address",
        default=f"127.0.0.1:{os.environ.get('GUARD_PORT', '50051')}",
        help="host:port of the guard's gRPC port (default: 127.0.0.1:$GUARD_PORT or 50051)",
    )
    parser.add_argument(
        "--service",
        default="",
        help='health service name ("" is the whole server; inference.GRPCInferenceService)',
    )
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument(
        "--tls-ca",
        default=os.environ.get("GUARD_HEALTHCHECK_TLS_CA") or os.environ.get("GUARD_TLS_CERT"),
        help="PEM roots to verify the server with; switches TLS on (default: the server's own "
        "certificate, GUARD_TLS_CERT, when set)",
    )
    parser.add_argument(
        "--tls-cert",
        default=os.environ.get("GUARD_HEALTHCHECK_TLS_CERT"),
        help="PEM client certificate, for mutual TLS",
    )
    parser.add_argument(
        "--tls-key", default=os.environ.get("GUARD_HEALTHCHECK_TLS_KEY"), help="its PEM key"
    )
    parser.add_argument(
        "--server-name",
        default=os.environ.get("GUARD_HEALTHCHECK_SERVER_NAME"),
        help="name the server certificate must carry, when it is not the address's host",
    )
    return parser.parse_args(argv)


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not args.tls_ca:
        return grpc.insecure_channel(args.address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(args.tls_ca).read_bytes(),
        private_key=Path(args.tls_key).read_bytes() if args.tls_key else None,
        certificate_chain=Path(args.tls_cert).read_bytes() if args.tls_cert else None,
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    return grpc.secure_channel(args.address, credentials, options=options)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    try:
        with _channel(args) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name.lower()}: {error.details()}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status.lower())
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
