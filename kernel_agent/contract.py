"""What the agent and the kernel processes it starts agree on: how to start one, what its exit means."""

from __future__ import annotations

#: The module the agent runs as `python -m KERNEL_MODULE --cluster C --name K --agent A ...`.
KERNEL_MODULE = "kernel_agent.kernel"
#: What the agent's fork server imports before it forks kernels (kernel_agent/agent/spawner.py):
#: all a kernel loads at start, so a forked kernel imports nothing of its own.
KERNEL_PRELOAD = ("kernel_agent.kernel.main",)
#: Exit code when the control plane no longer assigns this kernel to our agent.
EXIT_UNASSIGNED = 3


def split_capabilities(text: str) -> list[str]:
    """`--capabilities gpu,infer` as `kcp agent` takes it and passes it on to its kernels."""
    return [c.strip() for c in text.split(",") if c.strip()]
