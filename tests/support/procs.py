"""Start the processes tests signal with the default dispositions of the signals they send.

A background job of a non-interactive shell (`cmd &` in a script, nohup, some CI runners)
starts with SIGINT and SIGQUIT ignored, an ignored signal stays ignored across fork and exec,
and Python installs no KeyboardInterrupt handler over an inherited SIG_IGN. Without this,
a test that stops its child with SIGINT would pass or hang depending on how the suite itself
was started. Pass `default_signals` as `preexec_fn` (or call it first in a preexec hook).
"""

from __future__ import annotations

import signal
from collections.abc import Callable

# What tests send to the processes they start and expect the default action (or the child's
# own handler) to follow.
SENT_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def default_signals() -> None:
    """In the child, before exec: SIGINT and SIGTERM at SIG_DFL and unblocked.

    Fit for a preexec_fn in a threaded parent: sigaction and sigprocmask calls, no lock taken.
    """
    for sig in SENT_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SENT_SIGNALS)


def default_signals_then(hook: Callable[[], None] | None) -> Callable[[], None]:
    """A preexec_fn that resets the signals as default_signals does, then runs `hook`."""
    if hook is None:
        return default_signals

    def preexec() -> None:
        default_signals()
        hook()

    return preexec
