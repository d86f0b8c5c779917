"""Run a Python module with host names the test controls: `python -m tests.e2e.hosts_shim
sidecar work ...` with E2E_HOSTS="rebind.test=127.0.0.1,hooks.test=127.0.0.1".

The names in E2E_HOSTS resolve to the given addresses through `socket.getaddrinfo` (which
asyncio's loop.getaddrinfo calls), every other name as the system resolves it: a test of "a
name that resolves to 127.0.0.1" needs neither /etc/hosts nor outside DNS. The processes run
on asyncio's own loop (`sidecar work` does; uvicorn is given `--loop asyncio`), whose lookups
go through this function; uvloop's would not.
"""

from __future__ import annotations

import os
import runpy
import socket
import sys
from typing import Any

_system_getaddrinfo = socket.getaddrinfo


def _table(raw: str) -> dict[str, str]:
    pairs = (entry.split("=", 1) for entry in raw.split(",") if "=" in entry)
    return {name.strip().lower().rstrip("."): address.strip() for name, address in pairs}


TABLE = _table(os.environ.get("E2E_HOSTS", ""))


def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
    if isinstance(host, bytes):
        host = host.decode()
    if isinstance(host, str):
        host = TABLE.get(host.lower().rstrip("."), host)
    return _system_getaddrinfo(host, *args, **kwargs)


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m tests.e2e.hosts_shim MODULE [ARGS...]")
    socket.getaddrinfo = getaddrinfo
    module = sys.argv[1]
    sys.argv = [module, *sys.argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
