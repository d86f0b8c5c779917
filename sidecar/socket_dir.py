"""The socket's folder: whoever can write it can replace the socket and read every request.

The daemon creates the folder 0700 (0750 and setgid to SIDECAR_SOCKET_GROUP when a group may
connect) and refuses a folder that another user owns or that others can write; the client makes
the same check before it connects, so a socket planted by another local user is never used.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from sidecar.config import default_socket_path
from sidecar.errors import UnsafeSocket

# The default folder without XDG_RUNTIME_DIR names the uid that must own it.
_PER_UID_FOLDER = re.compile(r"/tmp/sidecar-(\d+)")
FOLDER_MODE = 0o700
GROUP_FOLDER_MODE = 0o2750  # setgid: the socket created inside takes the folder's group


def folder_problem(socket_path: str, owners: frozenset[int] | None) -> str | None:
    """Why the socket's folder is unsafe, or None; owners None accepts any owner."""
    folder = Path(socket_path).parent
    try:
        link = os.lstat(folder)
        st = os.stat(folder)
    except FileNotFoundError:
        return None  # nothing there yet: connecting fails, binding creates it
    except OSError as exc:
        return f"socket folder {folder} cannot be checked: {exc}"
    if stat.S_ISLNK(link.st_mode) and owners is not None and link.st_uid not in owners:
        return f"socket folder {folder} is a symlink owned by uid {link.st_uid}, not {_who(owners)}"
    if not stat.S_ISDIR(st.st_mode):
        return f"socket folder {folder} is not a folder"
    if owners is not None and st.st_uid not in owners:
        return (
            f"socket folder {folder} is owned by uid {st.st_uid}, not {_who(owners)}: "
            "its owner could replace the socket"
        )
    if st.st_mode & 0o022:
        if st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            # A shared sticky folder such as /tmp: others cannot replace a file they do not
            # own, so what matters is who owns the socket file itself.
            return _socket_file_problem(socket_path, owners)
        return (
            f"socket folder {folder} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}): "
            "anyone who can write it could replace the socket"
        )
    return None


def _socket_file_problem(socket_path: str, owners: frozenset[int] | None) -> str | None:
    try:
        st = os.lstat(socket_path)
    except OSError:
        return None
    if owners is not None and st.st_uid not in owners:
        return (
            f"socket {socket_path} in a shared folder is owned by uid {st.st_uid}, "
            f"not {_who(owners)}"
        )
    return None


def _who(owners: frozenset[int]) -> str:
    return " or ".join(f"uid {uid}" for uid in sorted(owners))


def client_owners(socket_path: str) -> frozenset[int] | None:
    """Who may own the folder of a socket a client connects to (None: any owner)."""
    folder = str(Path(socket_path).parent)
    if match := _PER_UID_FOLDER.fullmatch(folder):
        return frozenset({int(match[1]), 0})
    if socket_path == default_socket_path():  # $XDG_RUNTIME_DIR/sidecar: the user's own
        return frozenset({os.geteuid(), 0})
    # A path set explicitly may belong to the daemon's own user, unknown here; the mode
    # check still applies.
    return None


def check_socket_folder(socket_path: str) -> None:
    """The client's check before it connects: raise UnsafeSocket rather than use the socket."""
    problem = folder_problem(socket_path, client_owners(socket_path))
    if problem is not None:
        raise UnsafeSocket(f"refusing to connect: {problem}", {"path": socket_path, "sent": False})


def prepare_folder(socket_path: str, group: int | None) -> str | None:
    """Create the socket's folder with a safe mode when missing; why it is unsafe, or None."""
    folder = Path(socket_path).parent
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            folder.mkdir(mode=FOLDER_MODE)
        except FileExistsError:
            pass  # created meanwhile by someone else: checked below like any existing folder
        else:
            if group is not None:
                os.chown(folder, -1, group)
            # chmod after mkdir: the umask may have removed bits, and setgid needs chmod.
            os.chmod(folder, FOLDER_MODE if group is None else GROUP_FOLDER_MODE)
    return folder_problem(socket_path, frozenset({os.geteuid(), 0}))
