"""Clients for service processes: asyncio and blocking, plus the worker helper.

    aio.py         AsyncClient: one shared, pipelined connection per process
    blocking.py    Client: the blocking client, one request at a time per instance
    calls.py       each op's request and reply, built once for both clients
    connection.py  the asyncio connection: frames out, replies matched to their calls
    fold.py        concurrent single calls folded into one batch request
    worker.py      run_worker: take, run, keep leases, settle in batches
"""

from __future__ import annotations

from sidecar.client.aio import AsyncClient, connect
from sidecar.client.blocking import Client
from sidecar.client.calls import decode_payload, item
from sidecar.client.connection import socket_path
from sidecar.client.worker import Handler, PermanentFailure, RetryLater, run_worker
from sidecar.errors import SidecarError, SidecarUnavailable  # what every caller handles

__all__ = [
    "AsyncClient",
    "Client",
    "Handler",
    "PermanentFailure",
    "RetryLater",
    "SidecarError",
    "SidecarUnavailable",
    "connect",
    "decode_payload",
    "item",
    "run_worker",
    "socket_path",
]
