"""Talks to a sidecar with KServe's stock gRPC client (``kserve.InferenceGRPCClient``), which is
built from the official Open Inference Protocol: its parameters hold bool, int64 and string
values only (no ``double_param``, Triton's extension).

Runs in its own process: kserve's generated ``inference`` protobuf module and the guard's
define the same protocol symbols, and one process can register only one of them.

    python -m tests.clients.kserve_infer HOST:PORT MODEL INPUTS.npy  ->  JSON on stdout
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest
from kserve.protocol.infer_type import to_http_parameters


async def main(url: str, model: str, inputs_path: str) -> None:
    x = np.load(inputs_path, allow_pickle=False).astype(np.float32)
    answers = []
    async with InferenceGRPCClient(url, timeout=60) as client:
        for batch in (x[:1], x):  # one item (verdict in parameters), then a batch (tensors)
            tensor = InferInput(name="image", shape=list(batch.shape), datatype="FP32")
            tensor.set_data_from_numpy(batch)
            request = InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-1")
            response = await client.infer(request)
            answers.append(
                {
                    "id": response.id,
                    # What kserve makes of the parameters (bool, int64 and string ones only).
                    "parameters": to_http_parameters(response.parameters or {}),
                    "outputs": {o.name: o.as_numpy().tolist() for o in response.outputs},
                }
            )
    print(json.dumps(answers))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
