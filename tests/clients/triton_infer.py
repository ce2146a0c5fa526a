"""Talks to a sidecar with the stock tritonclient (KServe v2 / Open Inference Protocol).

Runs in its own process: tritonclient's generated ``inference`` protobuf module and the
guard's define the same protocol symbols, and one process can register only one of them.

    python -m tests.clients.triton_infer HOST:PORT MODEL INPUTS.npy  ->  JSON on stdout
"""

from __future__ import annotations

import json
import sys

import numpy as np
import tritonclient.grpc as triton
from google.protobuf.json_format import MessageToDict


def main(url: str, model: str, inputs_path: str) -> None:
    x = np.load(inputs_path, allow_pickle=False)
    client = triton.InferenceServerClient(url=url)
    metadata = client.get_model_metadata(model, as_json=True)
    answers = []
    for batch in (x[:1], x):  # one item (verdict in parameters), then a batch (verdict tensors)
        tensor = triton.InferInput(metadata["inputs"][0]["name"], list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch.astype(np.float32))
        result = client.infer(model, [tensor], request_id="triton-1")
        response = result.get_response()
        answers.append(
            {
                "id": response.id,
                "outputs": {o.name: result.as_numpy(o.name).tolist() for o in response.outputs},
                "parameters": MessageToDict(response, preserving_proto_field_name=True).get(
                    "parameters", {}
                ),
            }
        )
    print(
        json.dumps(
            {
                "live": client.is_server_live(),
                "ready": client.is_model_ready(model),
                "metadata": metadata,
                "answers": answers,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
