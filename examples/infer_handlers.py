"""An example user syscall: ``INFER``, a tiny deterministic linear model.

A handler module only needs a ``register(registry)`` function. Load it into every kernel an
agent starts with (the repository root must be importable, e.g. ``PYTHONPATH=.``)::

    kcp agent --handlers examples.infer_handlers

The kernels then declare the ``infer`` capability and run requests such as::

    {"type": "INFER", "requires": ["infer"], "inputs": [0.5, 1.0, 2.0], "seed": 7, "outputs": 2}

Each output is ``sum(w[i] * inputs[i]) + bias`` with weights and bias drawn from
``random.Random(seed)``, so the same request always gives the same answer on any kernel.
Bad arguments (a pydantic `ValidationError` from `InferArgs`) come back to the caller as
``InvalidArguments``.
"""

from __future__ import annotations

import math
import random
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from controlplane.protocol.requests import FiniteFloat
from kernel_agent.syscalls import SyscallContext, SyscallRegistry

MAX_INPUTS = 1024
MAX_OUTPUTS = 16


class InferArgs(BaseModel):
    """INFER's arguments (the request minus ``type`` and ``requires``)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    inputs: list[FiniteFloat] = Field(min_length=1, max_length=MAX_INPUTS)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    outputs: int = Field(1, ge=1, le=MAX_OUTPUTS)


def weights(seed: int, n_inputs: int, n_outputs: int) -> list[list[float]]:
    """One row per output: `n_inputs` weights then a bias, all in [-1, 1]."""
    rng = random.Random(seed)
    return [[rng.uniform(-1.0, 1.0) for _ in range(n_inputs + 1)] for _ in range(n_outputs)]


async def infer(ctx: SyscallContext, args: dict[str, Any]) -> dict[str, Any]:
    """Run the linear model seeded by ``seed`` over ``inputs``."""
    req = InferArgs.model_validate(args)
    rows = weights(req.seed, len(req.inputs), req.outputs)
    outputs = [math.fsum(w * x for w, x in zip(row[:-1], req.inputs, strict=True)) + row[-1] for row in rows]
    return {"outputs": outputs, "model": f"linear-seed{req.seed}", "kernel": ctx.kernel}


def register(registry: SyscallRegistry) -> None:
    """Add INFER (capability ``infer``) to `registry`."""
    registry.register(
        "INFER", infer, capabilities=["infer"], description="deterministic linear model over inputs"
    )
