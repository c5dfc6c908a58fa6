"""A stand-in kernel for tests/kernel_agent/test_spawner.py: `python -m tests.kernel_agent.forked`.

report PATH CODE   write what this process sees (argv, environment, open fds, whether the
                   fork server's preload is already imported, its parent) to PATH, exit CODE
sleep              wait for a signal (default dispositions: SIGTERM ends it)
"""

from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    if command == "report":
        path, code = rest
        seen = {
            "argv": sys.argv[1:],
            "env": dict(os.environ),
            "fds": sorted(int(fd) for fd in os.listdir("/proc/self/fd")),
            "preloaded": "kernel_agent.kernel.main" in sys.modules,
            "ppid": os.getppid(),
            "main": __name__,
        }
        with open(path, "w") as out:
            json.dump(seen, out)
        raise SystemExit(int(code))
    while True:
        time.sleep(60)
