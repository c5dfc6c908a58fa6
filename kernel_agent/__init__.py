"""The kcp agent: hosts kernels and executes their syscalls."""
