"""What the agent and the kernel processes it starts agree on: how to start one, what its exit means."""

from __future__ import annotations

#: The module the agent runs as `python -m KERNEL_MODULE --cluster C --name K --agent A ...`.
KERNEL_MODULE = "kernel_agent.kernel"
#: Exit code when the control plane no longer assigns this kernel to our agent.
EXIT_UNASSIGNED = 3
