"""A small client of the guard's own service, for the CLI, tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Self

import grpc
import numpy as np

from guard.errors import ConfigError
from guard.transport.grpc import tensors
from guard.transport.grpc.generated.guard.v1 import guard_pb2 as pb
from guard.transport.grpc.generated.guard.v1 import guard_pb2_grpc as pb_grpc
from guard.transport.grpc.tls import read_pem


def channel(
    target: str,
    *,
    tls_ca: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> grpc.Channel:
    """A channel to ``host:port``: plain, TLS (``tls_ca``), or mutual TLS (plus cert and key)."""
    if (client_cert is None) != (client_key is None):
        raise ConfigError("a client certificate and its key go together: give both or neither")
    if tls_ca is None:
        if client_cert is not None:
            raise ConfigError("a client certificate needs TLS: give the server's CA bundle too")
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls_ca, "the CA bundle"),
        private_key=read_pem(client_key, "the client key") if client_key else None,
        certificate_chain=read_pem(client_cert, "the client certificate") if client_cert else None,
    )
    return grpc.secure_channel(target, credentials)


class GuardClient:
    """``GuardService.Explain`` on encoded images or model-layout tensors."""

    def __init__(self, target: str | grpc.Channel, *, timeout: float = 60.0) -> None:
        self._channel = channel(target) if isinstance(target, str) else target
        self._stub = pb_grpc.GuardServiceStub(self._channel)
        self.timeout = timeout

    def explain(
        self,
        image: bytes | np.ndarray,
        *,
        model_name: str = "",
        include_mask: bool = False,
        request_id: str = "",
    ) -> pb.ExplainResponse:
        request = pb.ExplainRequest(
            model_name=model_name, include_mask=include_mask, request_id=request_id
        )
        if isinstance(image, bytes):
            request.image = image
        else:
            array = np.asarray(image)
            request.tensor.CopyFrom(
                pb.Tensor(
                    datatype=tensors.datatype_of(array.dtype),
                    shape=list(array.shape),
                    raw=np.ascontiguousarray(array).tobytes(),
                )
            )
        return self._stub.Explain(request, timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def unpack_mask(mask: pb.Mask) -> np.ndarray:
    """The MPS of a response as a boolean height x width array."""
    bits = np.unpackbits(np.frombuffer(mask.packed_bits, dtype=np.uint8))
    return bits[: mask.height * mask.width].reshape(mask.height, mask.width).astype(bool)
