"""The execution side of syscalls: kernel memory, a file table, the handler registry, the builtins.

A kernel owns one `KernelMemory` (bytes plus an in-memory file table) and one
`SyscallRegistry`. `SyscallRegistry.execute` parses a request with
`controlplane.requests`, runs the matching handler and returns its result dict, or
raises `SyscallError` whose `error_type` says what went wrong.

User syscalls live in modules with a ``register(registry)`` function, loaded with
`load_handlers` (see ``examples/infer_handlers.py``). The functions of an arq `WorkerSettings`
become syscalls through `arq_bridge` (``--arq-settings``, or ``arq_settings`` in a handler module).
"""

from kernel_agent.syscalls.builtins import builtin_registry, compute
from kernel_agent.syscalls.memory import BASE_ADDRESS, Deferral, ErrorType, KernelMemory, SyscallError
from kernel_agent.syscalls.registry import (
    Handler,
    JobInfo,
    SyscallContext,
    SyscallRegistry,
    arq_settings_in,
    declared_capabilities,
    load_handlers,
)

__all__ = [
    "BASE_ADDRESS",
    "Deferral",
    "ErrorType",
    "Handler",
    "JobInfo",
    "KernelMemory",
    "SyscallContext",
    "SyscallError",
    "SyscallRegistry",
    "arq_settings_in",
    "builtin_registry",
    "compute",
    "declared_capabilities",
    "load_handlers",
]
