"""Launch a command as systemd would with one socket: `python activate.py FD cmd...`.

The socket at FD becomes fd 3, LISTEN_FDS=1 and LISTEN_PID is this process's pid, which exec
keeps, so the daemon sees exactly what sd_listen_fds(3) expects from sidecar.socket.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str]) -> None:
    fd, command = int(argv[1]), argv[2:]
    if fd != 3:
        os.dup2(fd, 3)  # dup2 leaves fd 3 inheritable
        os.close(fd)
    else:
        os.set_inheritable(3, True)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ.pop("LISTEN_FDNAMES", None)
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv)
