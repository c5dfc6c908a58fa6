"""A kernel's memory (bytes with an allocator) and its file table, and the error a syscall raises."""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass
from enum import StrEnum

#: the lowest valid address; 0 (NULL) is never valid
BASE_ADDRESS = 0x1000
ALIGNMENT = 16
DEFAULT_MEMORY_BYTES = 1 << 20
DEFAULT_MAX_FDS = 1024
#: 0, 1 and 2 are stdin, stdout and stderr
FIRST_FD = 3


class ErrorType(StrEnum):
    """Values of `SyscallError.error_type` (plain strings on the wire)."""

    INVALID_ARGUMENTS = "InvalidArguments"
    SEGMENTATION_FAULT = "SegmentationFault"
    UNKNOWN_SYSCALL = "UnknownSyscall"
    OUT_OF_MEMORY = "OutOfMemory"
    BAD_FILE_DESCRIPTOR = "BadFileDescriptor"
    TOO_MANY_OPEN_FILES = "TooManyOpenFiles"
    HANDLER_ERROR = "HandlerError"


class SyscallError(Exception):
    """A syscall failed; `error_type` is one of `ErrorType` (or a handler's own string)."""

    def __init__(self, message: str, *, error_type: str = ErrorType.HANDLER_ERROR) -> None:
        super().__init__(message)
        self.error_type = str(error_type)


class Deferral(SyscallError):
    """The job is to run again after `defer_ms` as try `job_try` (an arq function raised `Retry`)."""

    def __init__(self, message: str, *, defer_ms: int, job_try: int) -> None:
        super().__init__(message, error_type="Retry")
        self.defer_ms = defer_ms
        self.job_try = job_try


# ------------------------------------------------------------------ files


@dataclass(frozen=True, slots=True)
class OpenFile:
    path: str
    mode: str


class FileTable:
    """In-memory files (path -> bytearray) and the descriptors open on them.

    OPEN creates a missing file in every mode; mode ``"w"`` truncates. Descriptors start
    at 3 and, as in POSIX, the lowest free one is reused.
    """

    def __init__(self, max_fds: int = DEFAULT_MAX_FDS) -> None:
        if max_fds < 1:
            raise ValueError(f"max_fds must be at least 1 (got {max_fds})")
        self.max_fds = max_fds
        self.files: dict[str, bytearray] = {}
        self._open: dict[int, OpenFile] = {}
        self._reusable: list[int] = []  # a heap of closed descriptors
        self._next = FIRST_FD

    def __len__(self) -> int:
        return len(self._open)

    def open(self, path: str, mode: str = "r") -> int:
        """Open `path` and return a new descriptor."""
        if len(self._open) >= self.max_fds:
            raise SyscallError(
                f"OPEN: too many open files (limit {self.max_fds})", error_type=ErrorType.TOO_MANY_OPEN_FILES
            )
        if mode == "w" or path not in self.files:
            self.files[path] = bytearray()
        if self._reusable:
            fd = heapq.heappop(self._reusable)
        else:
            fd, self._next = self._next, self._next + 1
        self._open[fd] = OpenFile(path, mode)
        return fd

    def close(self, fd: int) -> OpenFile:
        """Close `fd` and return what was open on it; BadFileDescriptor if it is not open."""
        entry = self._open.pop(fd, None)
        if entry is None:
            raise SyscallError(f"CLOSE: fd {fd} is not open", error_type=ErrorType.BAD_FILE_DESCRIPTOR)
        heapq.heappush(self._reusable, fd)
        return entry


# ------------------------------------------------------------------ memory


def _aligned(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


class KernelMemory:
    """`size` bytes addressed from `BASE_ADDRESS`, a first-fit allocator and a `FileTable`.

    READ and WRITE may touch any in-range address, allocated or not. Blocks are 16-byte
    aligned; freed blocks coalesce with free neighbours.
    """

    def __init__(self, size: int = DEFAULT_MEMORY_BYTES, *, max_fds: int = DEFAULT_MAX_FDS) -> None:
        if size < ALIGNMENT or size % ALIGNMENT:
            raise ValueError(f"memory size must be a positive multiple of {ALIGNMENT} (got {size})")
        self.size = size
        self._bytes = bytearray(size)
        self._free: list[tuple[int, int]] = [(BASE_ADDRESS, size)]  # sorted (start, length)
        self._allocated: dict[int, int] = {}  # address -> size asked for
        self.files = FileTable(max_fds)

    @property
    def end(self) -> int:
        """One past the last valid address."""
        return BASE_ADDRESS + self.size

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._free)

    @property
    def allocations(self) -> dict[int, int]:
        """A copy of address -> size for every live block."""
        return dict(self._allocated)

    def _offset(self, op: str, address: int, size: int) -> int:
        if address < BASE_ADDRESS or address + size > self.end:
            raise SyscallError(
                f"{op}: {size} bytes at {address:#x} fall outside memory {BASE_ADDRESS:#x}..{self.end:#x}",
                error_type=ErrorType.SEGMENTATION_FAULT,
            )
        return address - BASE_ADDRESS

    def read(self, address: int, size: int) -> bytes:
        """`size` bytes starting at `address`."""
        offset = self._offset("READ", address, size)
        return bytes(self._bytes[offset : offset + size])

    def write(self, address: int, data: bytes) -> int:
        """Copy `data` to `address`; returns the number of bytes written."""
        offset = self._offset("WRITE", address, len(data))
        self._bytes[offset : offset + len(data)] = data
        return len(data)

    def alloc(self, n: int) -> int:
        """Reserve `n` zeroed bytes (first fit) and return their address."""
        if n < 1:
            raise SyscallError(
                f"ALLOC: size must be positive (got {n})", error_type=ErrorType.INVALID_ARGUMENTS
            )
        need = _aligned(n)
        for i, (start, length) in enumerate(self._free):
            if length >= need:
                if length == need:
                    del self._free[i]
                else:
                    self._free[i] = (start + need, length - need)
                self._allocated[start] = n
                offset = start - BASE_ADDRESS
                self._bytes[offset : offset + need] = bytes(need)
                return start
        raise SyscallError(
            f"ALLOC: no free block of {n} bytes ({self.free_bytes} bytes free in total)",
            error_type=ErrorType.OUT_OF_MEMORY,
        )

    def free(self, address: int) -> int:
        """Release the block at `address`; returns its size."""
        n = self._allocated.pop(address, None)
        if n is None:
            raise SyscallError(
                f"FREE: {address:#x} is not the address of an allocated block (double free?)",
                error_type=ErrorType.SEGMENTATION_FAULT,
            )
        start, length = address, _aligned(n)
        i = bisect.bisect(self._free, (start, length))
        if i < len(self._free) and self._free[i][0] == start + length:
            length += self._free.pop(i)[1]
        if i > 0 and sum(self._free[i - 1]) == start:
            i -= 1
            prev_start, prev_length = self._free.pop(i)
            start, length = prev_start, prev_length + length
        self._free.insert(i, (start, length))
        return n
