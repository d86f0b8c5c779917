"""The local store's files: a snapshot plus append-only segments of checksummed events.

Layout under the state folder: `snapshot-<gen>.bin` (the whole state as events, written to a
temporary name, synced, then renamed) and `journal-<gen>.log` (the events since that snapshot).
Each record is a 4-byte big-endian length, a 4-byte checksum of the body, then the body
(one event in MessagePack). Replay loads the newest snapshot and the segments from its
generation on; compaction writes the next snapshot and removes the older files.

Group commit: `append` only buffers. One flush per loop pass writes the buffer and syncs it
in a worker thread while the loop keeps serving, and every change made meanwhile forms the
next group; a caller awaits `flushed()` before it replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import msgspec
import structlog

from sidecar.errors import StorageUnavailable
from sidecar.queue.local.events import AnyEvent

log = structlog.get_logger("sidecar.journal")

# length, checksum. zlib.crc32 rather than crc32c: the standard library has it (no compiled
# dependency to ship), it runs at several GB/s through zlib here, and it catches a torn or
# flipped record as surely as crc32c for our purpose (detection, not correction).
_HEAD = struct.Struct(">II")
# Past this many bytes of segments, the next flush writes a snapshot instead of appending.
DEFAULT_COMPACT_BYTES = 64 * 1024 * 1024
_SNAPSHOT_CHUNK = 1024 * 1024
# Longer than any one record (a record holds one payload, at most SIDECAR_MAX_PAYLOAD_BYTES,
# and a record adds a few hundred bytes): a bad stretch longer than this is not a torn tail.
_MAX_TAIL = 16 * 1024 * 1024

Writer = Callable[[int, bytes | memoryview], int]
Syncer = Callable[[int], None]


class JournalError(Exception):
    """The journal cannot be opened; the message is one line an operator can act on."""


def frame(body: bytes) -> bytes:
    """One journal record: length, crc32, body."""
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def _whole_record_after(data: bytes, off: int) -> bool:
    """Whether a whole, checksummed record starts anywhere after a bad one at `off`.

    A crash tears only the end of the file: bad bytes with a good record after them are
    damage (a flipped length can make a record look torn), never a tail to cut.
    """
    if len(data) - off > _MAX_TAIL:
        return True  # no single record is this long: the bad bytes are not a torn tail
    for start in range(off + 1, len(data) - _HEAD.size + 1):
        size, crc = _HEAD.unpack_from(data, start)
        end = start + _HEAD.size + size
        if size and end <= len(data) and zlib.crc32(data[start + _HEAD.size : end]) == crc:
            return True
    return False


def _gen(path: Path) -> int:
    return int(path.stem.split("-", 1)[1], 16)


class Journal:
    """Appends events with group commit; replays them; compacts into snapshots."""

    def __init__(
        self,
        directory: Path,
        *,
        fsync: bool = True,
        max_bytes: int = 1024 * 1024 * 1024,
        compact_bytes: int | None = None,
        compact_max_bytes: int = DEFAULT_COMPACT_BYTES,
        write: Writer = os.write,
        sync: Syncer = os.fdatasync,
    ) -> None:
        self.directory = directory
        self.fsync = fsync
        self.max_bytes = max_bytes
        # At most a quarter of the disk budget: a snapshot and the segments before it must fit.
        self.compact_bytes = compact_bytes or min(compact_max_bytes, max(max_bytes // 4, 4096))
        self._write = write  # the seam tests use to inject ENOSPC / EIO
        self._sync = sync
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(AnyEvent)
        self.snapshot_source: Callable[[], Iterable[AnyEvent]] = tuple
        self.gen = 0
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self.segment_bytes = 0
        self._group_start = 0  # where the group being written began: a failed one is cut there
        self.snapshot_bytes = 0
        self._buf = bytearray()
        self._waiter: asyncio.Future[StorageUnavailable | None] | None = None
        self._inflight: asyncio.Future[StorageUnavailable | None] | None = None
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # Set while the disk refuses writes: memory is ahead of the files until a snapshot
        # succeeds again (try_recover).
        self.failed: str | None = None
        self.last_error: StorageUnavailable | None = None
        self.records_replayed = 0
        self.tail_cut = 0

    # -- opening and replay -----------------------------------------------------------------

    def open(self) -> Iterator[AnyEvent]:
        """Lock the folder, then yield the events of the newest snapshot and later segments."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock()
        snapshots = sorted(self.directory.glob("snapshot-*.bin"), key=_gen)
        base = _gen(snapshots[-1]) if snapshots else 0
        self.gen = base
        if snapshots:
            yield from self._events(snapshots[-1], last=False)
        segments = sorted(
            (p for p in self.directory.glob("journal-*.log") if _gen(p) >= base), key=_gen
        )
        for i, seg in enumerate(segments):
            self.gen = max(self.gen, _gen(seg))
            yield from self._events(seg, last=i == len(segments) - 1)

    def _lock(self) -> None:
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"state folder {self.directory} is in use by another sidecar "
                "(give each daemon its own SIDECAR_STATE_DIR)"
            ) from None
        self._lock_fd = fd

    def _events(self, path: Path, *, last: bool) -> Iterator[AnyEvent]:
        data = path.read_bytes()
        off = 0
        while off < len(data):
            end = off + _HEAD.size
            if end <= len(data):
                size, crc = _HEAD.unpack_from(data, off)
                end += size
            if end > len(data) or zlib.crc32(data[off + _HEAD.size : end]) != crc:
                if last and not _whole_record_after(data, off):
                    self._cut_tail(path, off, len(data))
                    return
                raise self._damaged(path, off, "bad checksum")
            try:
                event = self._decoder.decode(data[off + _HEAD.size : end])
            except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
                raise self._damaged(path, off, f"unreadable record: {exc}") from None
            self.records_replayed += 1
            yield event
            off = end

    def _cut_tail(self, path: Path, off: int, size: int) -> None:
        # A crash in the middle of a write leaves a partial last record: it was never
        # acknowledged (the reply waits for the sync), so cutting it loses nothing promised.
        log.warning("journal_tail_cut", file=str(path), offset=off, bytes=size - off)
        os.truncate(path, off)
        self.tail_cut += size - off

    def _damaged(self, path: Path, off: int, why: str) -> JournalError:
        return JournalError(
            f"journal file {path} is damaged at byte {off} ({why}); the records after it "
            f"cannot be trusted. To start anyway, move it aside (mv {path} {path}.damaged) "
            "and restart: the requests recorded from that byte on are lost"
        )

    def start(self) -> None:
        """After replay: write a fresh snapshot of the rebuilt state and open a new segment."""
        self._loop = asyncio.get_running_loop()
        self._compact()

    # -- appending ----------------------------------------------------------------------------

    def append(self, event: AnyEvent) -> None:
        """Buffer one event; it reaches the disk with the rest of this loop pass's changes."""
        if self.failed is not None:
            return  # memory is ahead of the disk until try_recover writes a snapshot
        body = self._encoder.encode(event)
        self._buf += _HEAD.pack(len(body), zlib.crc32(body))
        self._buf += body
        if not self._scheduled and self._inflight is None and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._on_pass)

    @property
    def pending(self) -> bool:
        return bool(self._buf) or self._inflight is not None

    @property
    def disk_bytes(self) -> int:
        """Bytes the journal holds or is about to hold (snapshot, segment and buffer)."""
        return self.snapshot_bytes + self.segment_bytes + len(self._buf)

    async def flushed(self) -> None:
        """Return once everything appended so far is on disk; StorageUnavailable if it failed."""
        if self._buf and not self.fsync and self._inflight is None:
            # Without fsync nothing is worth waiting for: write now, so the reply needs no
            # extra loop pass.
            self._flush()
            if self.failed is not None and self.last_error is not None:
                raise self.last_error
            return
        if self._buf:
            if self._waiter is None:
                assert self._loop is not None
                self._waiter = self._loop.create_future()
            # Shielded: the group's future is shared by every waiter of the pass, and a waiter
            # that is cancelled (its client went away) must not cancel it for the others.
            err = await asyncio.shield(self._waiter)
        elif self._inflight is not None:
            err = await asyncio.shield(self._inflight)
        else:
            return
        if err is not None:
            raise err

    def _on_pass(self) -> None:
        """The once-per-loop-pass callback: write (and sync) what this pass appended."""
        self._scheduled = False
        self._flush()

    def _flush(self) -> None:
        if self._inflight is not None or not self._buf:
            return
        waiter, self._waiter = self._waiter, None
        data, self._buf = self._buf, bytearray()
        self._group_start = self.segment_bytes
        try:
            if self.segment_bytes + len(data) > self.compact_bytes:
                # The snapshot holds every change in `data` already: replaying both would
                # apply them twice, so the buffer is dropped once the snapshot is written.
                self._compact()
            else:
                self._write_all(data)
        except OSError as exc:
            self._fail(exc, waiter)
            return
        if not self.fsync:
            self._resolve(waiter, None)
            return
        assert self._loop is not None and self._fd is not None
        self._inflight = waiter or self._loop.create_future()
        job = self._loop.run_in_executor(None, self._sync, self._fd)
        job.add_done_callback(self._synced)

    def _synced(self, job: asyncio.Future[None]) -> None:
        done, self._inflight = self._inflight, None
        exc = job.exception()
        if isinstance(exc, OSError):
            self._fail(exc, done)
        elif exc is not None:
            self._fail(OSError(errno.EIO, f"sync failed: {exc!r}"), done)
        else:
            self._resolve(done, None)
        if self._buf and not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._on_pass)

    def _resolve(
        self, fut: asyncio.Future[StorageUnavailable | None] | None, err: StorageUnavailable | None
    ) -> None:
        if fut is not None and not fut.done():
            fut.set_result(err)

    def _write_all(self, data: bytes | bytearray) -> None:
        assert self._fd is not None
        view = memoryview(data)
        written = 0
        try:
            while written < len(view):
                written += self._write(self._fd, view[written:])
        finally:
            self.segment_bytes += written

    def _fail(self, exc: OSError, waiter: asyncio.Future[StorageUnavailable | None] | None) -> None:
        """The disk refused a write: cut back to the last whole record, refuse new requests."""
        reason = f"{errno.errorcode.get(exc.errno or 0, 'error')}: {exc.strerror or exc}"
        self.failed = reason
        self._buf = bytearray()
        if self._fd is not None:
            # Back to the end of the last group that was acknowledged: a partial record left
            # here would read as damage in the middle of the file once more records follow.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._group_start)
                self.segment_bytes = self._group_start
        log.error("journal_write_failed", error=reason, directory=str(self.directory))
        err = StorageUnavailable(
            f"the local store cannot write its journal ({reason}); the request was not accepted",
            {"reason": reason},
        )
        self.last_error = err
        self._resolve(waiter, err)
        for fut in (self._waiter, self._inflight):
            self._resolve(fut, err)
        self._waiter = self._inflight = None

    # -- compaction ---------------------------------------------------------------------------

    def _compact(self) -> None:
        """Write the next snapshot from the live state, open its segment, remove older files."""
        gen = self.gen + 1
        final = self.directory / f"snapshot-{gen:016x}.bin"
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        size = 0
        try:
            chunk = bytearray()
            for event in self.snapshot_source():
                body = self._encoder.encode(event)
                chunk += _HEAD.pack(len(body), zlib.crc32(body))
                chunk += body
                if len(chunk) >= _SNAPSHOT_CHUNK:
                    size += self._write_fd(fd, chunk)
                    chunk = bytearray()
            size += self._write_fd(fd, chunk)
            if self.fsync:
                self._sync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.rename(tmp, final)
        segment = os.open(
            self.directory / f"journal-{gen:016x}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600
        )
        self._sync_dir()
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self.gen = segment, gen
        self.segment_bytes = self._group_start = 0
        self.snapshot_bytes = size
        for old in [*self.directory.glob("snapshot-*"), *self.directory.glob("journal-*")]:
            if old.suffix in (".bin", ".log", ".tmp") and _gen(old) < gen:
                old.unlink()

    def _write_fd(self, fd: int, data: bytearray) -> int:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += self._write(fd, view[written:])
        return written

    def _sync_dir(self) -> None:
        if not self.fsync:
            return
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def try_recover(self) -> bool:
        """After a write failure: write a snapshot of memory; True once the disk takes it."""
        if self.failed is None:
            return True
        try:
            self._compact()
        except OSError as exc:
            log.warning("journal_still_failing", error=str(exc))
            return False
        log.info("journal_recovered", previous_error=self.failed)
        self.failed = None
        return True

    async def close(self) -> bool:
        """Write the final snapshot; True when everything the store holds is on disk."""
        with contextlib.suppress(StorageUnavailable):
            await self.flushed()
        kept = False
        try:
            if self._loop is not None:
                self._buf = bytearray()  # the snapshot holds these changes
                self._compact()
                self.failed = None
                kept = True
        except OSError as exc:
            log.error("journal_final_snapshot_failed", error=str(exc))
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        return kept
