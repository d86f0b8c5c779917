"""Fold py-spy's raw stacks (`record --native --threads --nolineno --format raw`) into tables.

A raw line is `thread (tid): name;frame;frame;...;leaf count`, outermost frame first. A Python
frame reads `Class.func (package/module.py)`, a native one `func (file.c)` or `func (lib.so)`
(`0x7f... (lib.so)` when unnamed). py-spy, with native frames, does not leave out idle samples
here, so this module does: a sample whose native tail (the frames below its innermost Python
frame) waits in `epoll_pwait` or on a lock is idle, not work.

Percentages are of the event-loop thread's busy samples (MainThread, idle left out): that
thread is the daemon's one core of request work. Other threads (the executor that runs the
journal's fdatasync) are counted apart.

Each busy sample's **self** bucket is that of its innermost Python frame (a native callee, such
as msgspec's encoder or the write system call, counts for the Python code that called it), with
two native exceptions: the garbage collector, and no Python frame inside the loop at all (the
loop's own C: uvloop and libuv reading sockets, running callbacks). A sample counts **inclusive**
once for every bucket and every Python frame on its stack.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.tables import markdown_table

# The buckets, in the order the tables list them.
FRAME_DECODE = "frame decode"
DISPATCH = "op dispatch (server, ops, tasks)"
STORE = "store logic"
JOURNAL = "journal write/fsync"
REDIS = "Redis client/hiredis"
REPLY = "reply encode/write"
ASYNCIO = "asyncio tasks/futures/timeouts"
LOOP = "event loop/uvloop"
LOGGING = "logging/structlog"
METRICS = "metrics"
GC = "gc"
GIL = "thread hand-off (GIL, locks)"
OTHER = "other"
BUCKETS = (
    FRAME_DECODE, DISPATCH, STORE, JOURNAL, REDIS, REPLY, ASYNCIO, LOOP, LOGGING, METRICS, GC,
    GIL, OTHER,
)  # fmt: skip

_PY_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*\.py|<frozen [^>]*>)\)$")
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*)\)$")
# Natives that mean the thread is waiting, not working (below its innermost Python frame).
_IDLE_NATIVES = ("epoll_pwait", "epoll_wait", "PyThread_acquire_lock_timed", "select", "poll")
# Stdlib helpers whose cost belongs to their caller (task registration, context managers).
# The executor's submit and its thread's entry count for whoever handed them work.
_TRANSPARENT = (
    "_weakrefset.py", "contextlib.py", "functools.py", "abc.py", "typing.py", "threading.py",
    "concurrent/futures/thread.py",
)  # fmt: skip
# The loop's own outer frames: as the innermost Python frame they mean "the loop's C ran".
_LOOP_ROOTS = ("asyncio/runners.py", "uvloop/__init__.py", "asyncio/base_events.py")

# (file prefix, function prefix or "", bucket); first match wins.
_RULES: tuple[tuple[str, str, str], ...] = (
    ("sidecar/protocol/codec.py", "FrameReader", FRAME_DECODE),
    ("sidecar/protocol/codec.py", "decode_request", FRAME_DECODE),
    ("sidecar/protocol/codec.py", "_salvage", FRAME_DECODE),
    ("sidecar/protocol/codec.py", "payload_depth", FRAME_DECODE),
    ("sidecar/protocol/codec.py", "_skips", FRAME_DECODE),
    ("sidecar/protocol/codec.py", "", REPLY),
    ("sidecar/protocol/", "", REPLY),  # error_reply and friends build replies
    ("sidecar/server/connection.py", "_frame", REPLY),
    ("sidecar/server/connection.py", "Connection._take_ready", REPLY),
    ("sidecar/server/connection.py", "Connection._write_now", REPLY),
    ("sidecar/server/connection.py", "Connection._flush", REPLY),
    ("sidecar/server/connection.py", "Connection._run", REPLY),
    ("sidecar/server/", "", DISPATCH),
    ("sidecar/eager.py", "", DISPATCH),
    ("sidecar/queue/local/journal.py", "", JOURNAL),
    ("sidecar/metrics/registry.py", "DaemonMetrics.timed_sync", JOURNAL),
    ("sidecar/queue/redis/", "", REDIS),
    ("redis/", "", REDIS),
    ("hiredis/", "", REDIS),
    ("sidecar/queue/", "", STORE),
    ("sidecar/models.py", "", STORE),
    ("sidecar/logs.py", "", LOGGING),
    ("structlog/", "", LOGGING),
    ("logging/", "", LOGGING),
    ("sidecar/metrics/", "", METRICS),
    ("sidecar/observe.py", "", METRICS),
    ("prometheus_client/", "", METRICS),
    ("asyncio/", "", ASYNCIO),
    ("uvloop/", "", LOOP),
)


def python_frame(frame: str) -> tuple[str, str] | None:
    """(function, file) of a Python frame; None for a native one."""
    m = _PY_FRAME.match(frame)
    return (m["func"], m["file"]) if m else None


def bucket_of(func: str, file: str) -> str:
    """The bucket of a Python frame, by its file and function."""
    for prefix, func_prefix, bucket in _RULES:
        if file.startswith(prefix) and func.startswith(func_prefix):
            return bucket
    return OTHER


def short(frame: str) -> str:
    """A frame as the tables print it: `func (file)`, sidecar/ and site-packages trimmed."""
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m["file"].removeprefix("sidecar/")
    if file.endswith(".so") or ".so." in file:
        file = file.rsplit("/", 1)[-1].split(".", 1)[0]
    return f"{m['func']} ({file})"


@dataclass(frozen=True)
class Sample:
    """One distinct stack: its thread's name, its frames (outermost first), its count."""

    thread: str
    frames: tuple[str, ...]
    count: int


def parse_raw(lines: Iterable[str]) -> list[Sample]:
    """The raw format's lines as samples (blank or malformed lines are skipped)."""
    out = []
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        thread = ""
        if frames[0].startswith("thread ("):
            thread = frames[0].split(": ", 1)[1] if ": " in frames[0] else frames[0]
            frames = frames[1:]
        out.append(Sample(thread, tuple(frames), int(count)))
    return out


def _innermost_python(frames: Sequence[str]) -> int:
    """Index of the innermost Python frame that is not a transparent stdlib helper, or -1."""
    for i in range(len(frames) - 1, -1, -1):
        py = python_frame(frames[i])
        if py is not None and not py[1].endswith(_TRANSPARENT):
            return i
    return -1


def _inside_loop(frames: Sequence[str]) -> int:
    """Index of the first frame below the loop's roots (the process's entry, run_forever)."""
    for i in range(len(frames) - 1, -1, -1):
        py = python_frame(frames[i])
        if py is not None and py[1].endswith(_LOOP_ROOTS):
            return i + 1
    return 0


def is_idle(frames: Sequence[str]) -> bool:
    """Waiting: an idle native below the innermost Python frame (or anywhere, if none)."""
    tail = frames[_innermost_python(frames) + 1 :]
    return any(f.split(" (", 1)[0] in _IDLE_NATIVES for f in tail)


def self_of(frames: Sequence[str]) -> tuple[str, str]:
    """(bucket, frame label) the sample's self time goes to."""
    i = _innermost_python(frames)
    tail = frames[i + 1 :]
    if any(f.startswith("gc_collect") for f in tail):
        return GC, "gc_collect_main (libpython)"
    if tail and tail[-1].startswith(("pthread_cond_signal ", "sem_post ")):
        # Releasing the GIL (or a lock) to a waiting thread: the executor that runs fdatasync.
        return GIL, short(tail[-1])
    if i < 0:
        return LOOP, short(frames[-1]) if frames else "?"
    py = python_frame(frames[i])
    assert py is not None
    func, file = py
    if file.endswith(_LOOP_ROOTS):
        # No Python code below the loop: uvloop's / libuv's own C (reads, callbacks, timers).
        named = [f for f in tail if not f.startswith("0x") and "(object.h)" not in f]
        return LOOP, short(named[-1]) if named else "uvloop (native)"
    label = short(frames[i])
    # The system calls and the compressor a Python frame makes are worth their own rows.
    leaf = tail[-1].split(" (", 1)[0] if tail else ""
    if leaf in ("write", "writev", "read", "recv", "send", "sendmsg", "fdatasync", "fsync"):
        label += f" > {leaf}"
    elif leaf.startswith("crc32"):
        label += " > crc32"
    return bucket_of(func, file), label


@dataclass
class Profile:
    """The folded samples of one case."""

    busy: int = 0  # the event-loop thread's samples spent working
    idle: int = 0  # the event-loop thread's samples spent waiting (epoll)
    others: Counter[str] = field(default_factory=Counter)  # other threads: self label -> count
    others_idle: int = 0
    self_buckets: Counter[str] = field(default_factory=Counter)
    incl_buckets: Counter[str] = field(default_factory=Counter)
    self_frames: Counter[str] = field(default_factory=Counter)
    incl_frames: Counter[str] = field(default_factory=Counter)
    frame_bucket: dict[str, str] = field(default_factory=dict)

    def pct(self, n: int) -> float:
        return 100.0 * n / self.busy if self.busy else 0.0


def fold(samples: Iterable[Sample], main_thread: str = "MainThread") -> Profile:
    """Self and inclusive counts, per bucket and per frame, of the event-loop thread's work."""
    p = Profile()
    for s in samples:
        idle = is_idle(s.frames)
        if s.thread and s.thread != main_thread:
            if idle:
                p.others_idle += s.count
            else:
                p.others[self_of(s.frames)[1]] += s.count
            continue
        if idle:
            p.idle += s.count
            continue
        p.busy += s.count
        bucket, label = self_of(s.frames)
        p.self_buckets[bucket] += s.count
        p.self_frames[label] += s.count
        p.frame_bucket.setdefault(label, bucket)
        buckets = {bucket}
        labels = {label}
        for f in s.frames[_inside_loop(s.frames) :]:
            py = python_frame(f)
            if py is None or py[1].endswith(_TRANSPARENT):
                continue
            b = bucket_of(*py)
            buckets.add(b)
            labels.add(short(f))
            p.frame_bucket.setdefault(short(f), b)
        for b in buckets:
            p.incl_buckets[b] += s.count
        for label in labels:
            p.incl_frames[label] += s.count
    return p


def _pct(p: Profile, n: int) -> str:
    return f"{p.pct(n):.1f}"


def bucket_table(p: Profile) -> str:
    """Per bucket: self % and inclusive % of the event-loop thread's busy samples."""
    rows = [
        (b, _pct(p, p.self_buckets[b]), _pct(p, p.incl_buckets[b]))
        for b in sorted(BUCKETS, key=lambda b: -p.self_buckets[b])
        if p.self_buckets[b] or p.incl_buckets[b]
    ]
    return markdown_table(("bucket", "self %", "inclusive %"), rows)


def frame_table(p: Profile, top: int) -> str:
    """The top frames by self time, then the top by inclusive time not already listed."""
    by_self = [f for f, _ in p.self_frames.most_common(top)]
    by_incl = [f for f, _ in p.incl_frames.most_common() if f not in by_self][:top]
    rows = [
        (how, f, p.frame_bucket.get(f, OTHER), _pct(p, p.self_frames[f]), _pct(p, p.incl_frames[f]))
        for how, frames in (("self", by_self), ("incl", by_incl))
        for f in frames
    ]
    return markdown_table(("top by", "frame", "bucket", "self %", "inclusive %"), rows)
