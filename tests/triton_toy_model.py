"""A small Python model behind a real Triton Inference Server (nvidia-pytriton), for the driver's protocol test.

    .venv-triton/bin/python tests/triton_toy_model.py GRPC_PORT    (HTTP on GRPC_PORT + 1, metrics + 2)

Serves model `dlrm` with inputs `dense` FP32 [n, 13] and `sparse` INT32 [n, 26] and output `probability`
FP32 [n, 1] (Triton's usual shape for one value a row): a fixed logistic function of the inputs
(`toy_probability`, importable without pytriton, so the test can recompute every prediction).

Runs in its own virtual environment made from the system's Python 3.11 (`make test` makes it): the Triton
Python-backend stub that nvidia-pytriton ships embeds the system's libpython 3.11, and under another 3.11's
standard library it fails to start (`_thread.RLock` has no `_recursion_count`).
"""
from __future__ import annotations

import sys

import numpy as np


def toy_probability(dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
    """float32 [n]: sigmoid of a fixed mix of the dense values and the ids."""
    z = (dense.astype(np.float32).sum(axis=1) * np.float32(0.01)
         + (sparse.astype(np.int64) % 7).sum(axis=1).astype(np.float32) * np.float32(0.001) - np.float32(1.0))
    return (np.float32(1.0) / (np.float32(1.0) + np.exp(-z))).astype(np.float32)


def serve(grpc_port: int) -> None:
    from pytriton.decorators import batch
    from pytriton.model_config import ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig

    @batch
    def infer(dense: np.ndarray, sparse: np.ndarray) -> dict[str, np.ndarray]:
        return {"probability": toy_probability(dense, sparse)[:, None]}

    config = TritonConfig(grpc_port=grpc_port, http_port=grpc_port + 1, metrics_port=grpc_port + 2)
    with Triton(config=config) as triton:
        triton.bind(model_name="dlrm", infer_func=infer,
                    inputs=[Tensor(name="dense", dtype=np.float32, shape=(13,)),
                            Tensor(name="sparse", dtype=np.int32, shape=(26,))],
                    outputs=[Tensor(name="probability", dtype=np.float32, shape=(1,))],
                    config=ModelConfig(max_batch_size=1 << 21))
        triton.serve()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
