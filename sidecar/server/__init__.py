"""The daemon's side of the socket: the listener, each connection, the ops they run.

listener.py    binds the socket (or serves systemd's), accepts, drains on stop
state.py       ServerState: limits, byte budget, admission, live connections, observer
connection.py  one connection: frames in, ops run concurrently, replies out in order
ops.py         Ops: each request turned into a call on the store, and its reply
"""

from __future__ import annotations

from sidecar.errors import StartupError, UnsafeSocketFolder
from sidecar.server.listener import SidecarServer, prepare_socket_path
from sidecar.server.ops import Ops
from sidecar.server.state import ServerState

__all__ = [
    "Ops",
    "ServerState",
    "SidecarServer",
    "StartupError",
    "UnsafeSocketFolder",
    "prepare_socket_path",
]
