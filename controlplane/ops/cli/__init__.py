"""The `kcp` command line."""

from controlplane.ops.cli.main import main

__all__ = ["main"]
