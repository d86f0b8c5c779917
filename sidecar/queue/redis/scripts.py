"""The scripts' calls: loading them, and running concurrent calls in shared round trips.

The scripts run as Redis Functions of one library (FCALL), or as plain scripts (EVALSHA) where
the server has no Functions. Each call adds its command to a batch, and the batch of each
event-loop iteration goes out in one pipeline at its end, with concurrent enqueues (and
completes) folded into shared runs (fold.py). On a plain server the batch goes out on the
lean connection of wire.py; Sentinel and Cluster clients (and fakes) keep redis-py's
pipeline.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterable
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError, NoScriptError, OutOfMemoryError, ResponseError

from sidecar import eager
from sidecar.errors import BackendUnavailable
from sidecar.queue.redis.fold import (
    EARLY_FLUSH_ITEMS,
    FOLDED_SCRIPTS,
    ScriptCall,
    fold,
    fold_groups,
    folds,
    items_of,
    unfold,
)
from sidecar.queue.redis.io import RedisClient, redis_errors, translate_error, unavailable_kind
from sidecar.queue.redis.keys import FUNCTION_NAMES, LIBRARY, SCRIPT_SHAS, SCRIPTS
from sidecar.queue.redis.wire import Arg, WireClient, encode_bulks, encode_command, wire_spec

# The scripts whose success is an acknowledgement of durability to a producer: with
# REDIS_MIN_REPLICAS_ACK their pipeline ends with WAIT (settles are not waited on: one lost in
# a failover shows as a redelivery, which at-least-once delivery already covers).
ACKED_SCRIPTS = frozenset({"enqueue"})


def missing_script(reply: object) -> bool:
    """Whether a reply says its call never ran because the server lacks the script: NOSCRIPT,
    a function not found (Redis restarted empty, FUNCTION FLUSH), or no FCALL at all (a
    failover to a server older than Redis 7). Loading the scripts again, and resending, heals it.
    """
    if isinstance(reply, NoScriptError):
        return True
    return isinstance(reply, ResponseError) and str(reply).startswith(_MISSING)


_MISSING = ("Function not found", "unknown command 'FCALL'", "unknown command `FCALL`")


class ScriptRunner:
    """Runs the scripts of lua/: loads them, folds concurrent calls into shared pipelines."""

    def __init__(
        self,
        client: RedisClient,
        log: Any,
        *,
        min_replicas: int = 0,
        replicas_timeout_ms: int = 0,
        fixed_keys: tuple[str, ...] = (),
        functions: bool | None = None,
        owns_client: bool = True,
    ) -> None:
        """functions: FCALL the library's functions, or (False) EVALSHA plain scripts; None
        decides at each load: Functions unless the server does not know FUNCTION LOAD.
        owns_client: close the client at close (False: another queue shares it and closes it).
        """
        self.client = client
        self.owns_client = owns_client
        self.functions = functions
        self.min_replicas = min_replicas
        self.replicas_timeout_ms = replicas_timeout_ms
        # Counters for tests and metrics: pipelines sent, and load rounds (library or scripts).
        self.flushes = 0
        self.script_loads = 0
        self.closed = False
        self._log = log
        self._batch: list[ScriptCall] = []
        self._batch_items = 0  # requests the batch's calls carry (a folded script's items)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sending: set[asyncio.Future[list[Any]]] = set()  # lone batches' writes (_flush)
        self._loading: asyncio.Task[None] | None = None  # a load after a missing script
        spec = wire_spec(client)
        # The lean connection where the client reaches one plain server, else redis-py's.
        self.wire = None if spec is None else WireClient(spec)
        # The KEYS every call starts with and each script's name, encoded once: most of a
        # call's arguments, which the lean path would otherwise encode again every time.
        self._fixed_keys = fixed_keys
        self._fixed_bulks = encode_bulks(fixed_keys)
        self._use(functions is not False)

    @property
    def uses_functions(self) -> bool:
        """Whether calls go out as FCALL (else EVALSHA)."""
        return self._heads is _FUNCTION_HEADS

    def _use(self, functions: bool) -> None:
        self._heads = _FUNCTION_HEADS if functions else _SCRIPT_HEADS
        self._head_bulks = {n: encode_bulks(head) for n, head in self._heads.items()}

    async def load_scripts(self) -> None:
        """FUNCTION LOAD the library (REPLACE: every daemon of this version loads the same), or
        SCRIPT LOAD every script where the server has no Functions or refuses to load them;
        either way the names calls use are known in advance (keys.py)."""
        functions = self.functions is not False
        if functions:
            try:
                await self.client.function_load(LIBRARY, replace=True)
            except ResponseError as exc:
                if self.functions or not _functions_refused(exc):
                    raise
                if str(exc).startswith("unknown command"):  # before Redis 7
                    self._log.info("redis_functions_missing", using="scripts")
                else:
                    self._log.warning("redis_functions_refused", error=str(exc), using="scripts")
                functions = False
        if not functions:
            for name, source in SCRIPTS.items():
                sha = await self.client.script_load(source)
                if sha != SCRIPT_SHAS[name]:  # pragma: no cover - Redis would hash differently
                    raise RuntimeError(f"script {name}: Redis named it {sha}")
        self._use(functions)
        self.script_loads += 1

    async def close(self) -> None:
        """Refuse new calls, let in-flight pipelines finish, close the connections."""
        self.closed = True
        self._flush()  # the calls of this loop pass go out now, not after the connection closes
        while self._tasks or self._sending:  # a write's reply may hand its calls to a task
            await asyncio.gather(*self._tasks, *self._sending, return_exceptions=True)
        if self.wire is not None:
            await self.wire.close()
        if self.owns_client:
            await close_client(self.client)

    def call(
        self, script: str, keys: tuple[str, ...], args: tuple[Arg, ...]
    ) -> asyncio.Future[list[Any]]:
        """Run one script in the next shared pipeline: the future of its reply."""
        if self.closed:
            raise BackendUnavailable("redis queue is closed", {"kind": "closed"})
        loop = asyncio.get_running_loop()
        call = ScriptCall(script, keys, args, loop.create_future())
        self._batch.append(call)
        self._batch_items += items_of(call) if call.script in FOLDED_SCRIPTS else 1
        if len(self._batch) == 1:
            # The first call of this loop iteration schedules the flush; every call made
            # before it runs joins the same pipeline.
            loop.call_soon(self._flush)
        if self._batch_items >= EARLY_FLUSH_ITEMS and self.wire is not None:
            # Enough to be worth a run of its own: written to Redis now, inside this call, so
            # Redis works on it while this pass makes the rest (a pipeline rather than a lock
            # step of whole bursts). Only on the lean connection, whose first step to the
            # write enters no asyncio.timeout (eager.py); the scheduled flush takes the rest.
            batch, self._batch, self._batch_items = self._batch, [], 0
            task = eager.start(loop, self._run(batch))
            if task is not None:
                self._track(task)
        return call.future

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _flush(self) -> None:
        """At the end of the loop pass: send its calls (if an early flush left any).

        A batch that needs nothing but its write (the lean connection open, no calls to fold,
        no WAIT: one call at a time, say) is written here and resolved by a callback on its
        reply, with no task and no coroutines to resume. Any other batch, and any reply but a
        plain one (a lost connection, a missing script), goes through _run in a task.
        """
        batch, self._batch, self._batch_items = self._batch, [], 0
        if not batch:
            return
        wire = self.wire
        sent = None
        if wire is not None and not self.min_replicas and not folds(batch):
            try:
                sent = wire.send([self._encode(call) for call in batch])
            except Exception as exc:  # an argument of a type Redis cannot take
                _fail(batch, exc)
                return
        if sent is None:  # no connection open (it connects in the task), or not a lone batch
            self._track(asyncio.get_running_loop().create_task(self._run(batch)))
            return
        self.flushes += 1
        self._sending.add(sent)
        sent.add_done_callback(functools.partial(self._sent, batch, self.script_loads))

    def _sent(self, batch: list[ScriptCall], loads: int, sent: asyncio.Future[list[Any]]) -> None:
        """The replies to a batch _flush wrote: resolved here, or its calls handed to a task."""
        self._sending.discard(sent)
        if sent.cancelled():  # only by a cancelled close(), which gathers the writes in flight
            _fail(batch, RedisConnectionError("redis write cancelled"))
            return
        exc = sent.exception()
        if exc is not None:
            if isinstance(exc, RedisConnectionError):
                # _send_wire's one retry, on a fresh connection: the only one.
                self._track(asyncio.get_running_loop().create_task(self._run(batch, retry=False)))
            else:
                _fail(batch, exc)
            return
        pairs = list(zip(batch, sent.result(), strict=True))
        missing = [call for call, reply in pairs if missing_script(reply)]
        if missing:
            # Those calls never ran (Redis restarted empty, say): load, then send them again.
            run = self._run(missing, reload_from=loads)
            self._track(asyncio.get_running_loop().create_task(run))
            pairs = [pair for pair in pairs if not missing_script(pair[1])]
        _settle(pairs)

    async def _run(
        self, batch: list[ScriptCall], retry: bool = True, reload_from: int | None = None
    ) -> None:
        """Send batch in one pipeline and resolve each call's future in order.

        retry: one more try on a fresh connection when the lean one is lost (_send_wire).
        reload_from: the batch met a missing script when the load count was this; load first.
        """
        self.flushes += 1
        try:
            if reload_from is not None:
                await self._reload(reload_from)
            replies = await self._folded(batch, retry)
        except asyncio.CancelledError:
            for call in batch:
                call.future.cancel()
            raise
        except Exception as exc:  # every waiter must hear of the failure
            _fail(batch, exc)
            return
        _settle(zip(batch, replies, strict=True))

    async def _folded(self, batch: list[ScriptCall], retry: bool) -> list[Any]:
        """The batch's replies, in order, with concurrent enqueues (and completes) folded into
        shared runs, one script's calls in each.

        enqueue.lua and complete.lua take a batch, and one run of n requests costs Redis much
        less than n runs of one. A script error that is not an outage (a bad argument: raised
        before any write) fails a whole run, so a failed folded run is retried call by call,
        and only the call at fault gets the error.
        """
        by_script: dict[str, list[int]] = {}
        for i, call in enumerate(batch):
            if call.script in FOLDED_SCRIPTS:
                by_script.setdefault(call.script, []).append(i)
        folding = [ids for ids in by_script.values() if len(ids) > 1]
        if not folding:
            return await self._pipeline(batch, retry)
        singles = [i for ids in folding for i in ids]
        chosen = set(singles)
        others = [call for i, call in enumerate(batch) if i not in chosen]
        groups = [g for ids in folding for g in fold_groups([batch[i] for i in ids])]
        runs = [fold(group, batch[0].future.get_loop()) for group in groups]
        replies = await self._pipeline(others + runs, retry)
        parts: list[Any] = []
        for group, reply in zip(groups, replies[len(others) :], strict=True):
            if isinstance(reply, ResponseError) and unavailable_kind(reply) is None:
                parts += await self._pipeline(group, retry)
            else:
                parts += unfold(reply, group)
        merged = iter(replies[: len(others)])
        by_index = dict(zip(singles, parts, strict=True))
        return [by_index[i] if i in chosen else next(merged) for i in range(len(batch))]

    async def _pipeline(self, batch: list[ScriptCall], retry: bool) -> list[Any]:
        loads = self.script_loads
        replies = await self._send(batch, retry)
        # That call never ran (Redis restarted empty, SCRIPT or FUNCTION FLUSH): load, resend.
        missing = [i for i, reply in enumerate(replies) if missing_script(reply)]
        if missing:
            await self._reload(loads)
            again = await self._send([batch[i] for i in missing], retry)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _reload(self, loads_when_sent: int) -> None:
        """Load the scripts once for every run that met a missing script: runs in flight together
        share one load, and a run sent before a load that has ended since needs none."""
        if self.script_loads != loads_when_sent:
            return
        if self._loading is None:
            self._log.info("redis_scripts_reloaded")
            self._loading = asyncio.get_running_loop().create_task(self.load_scripts())
            self._loading.add_done_callback(self._loaded)
        await asyncio.shield(self._loading)

    def _loaded(self, task: asyncio.Task[None]) -> None:
        self._loading = None
        if not task.cancelled():
            task.exception()  # observed even when every run that waited was cancelled

    async def _send(self, batch: list[ScriptCall], retry: bool) -> list[Any]:
        acked = [i for i, call in enumerate(batch) if call.script in ACKED_SCRIPTS]
        wait = self.min_replicas > 0 and bool(acked)
        if self.wire is not None:
            replies = await self._send_wire(self.wire, batch, wait, retry)
        else:
            replies = await self._send_pipeline(batch, wait, acked)
        if wait:
            confirmed = replies.pop()
            short = self._short_of_replicas(confirmed, "enqueue")
            if short is not None:
                for i in acked:
                    if not isinstance(replies[i], Exception):
                        replies[i] = short
        return replies

    async def _send_wire(
        self, wire: WireClient, batch: list[ScriptCall], wait: bool, retry: bool
    ) -> list[Any]:
        commands = [self._encode(call) for call in batch]
        if wait:
            # On the same connection: WAIT counts the replicas that have its writes so far.
            commands.append(encode_command(("WAIT", self.min_replicas, self.replicas_timeout_ms)))
        try:
            return await wire.execute(commands)
        except RedisConnectionError:
            if not retry:
                raise
            # The same one retry as redis-py's (see _client_options): on a fresh connection,
            # for a connection error only, never a timeout; every script is safe to run twice.
            return await wire.execute(commands)

    def _encode(self, call: ScriptCall) -> bytes:
        """FCALL name (or EVALSHA sha) numkeys keys... args..., fixed parts encoded once."""
        fixed, keys = self._fixed_keys, call.keys
        if not fixed or keys[: len(fixed)] != fixed:
            return encode_command((*self._heads[call.script], len(keys), *keys, *call.args))
        header = b"*%d\r\n" % (3 + len(keys) + len(call.args))
        count = encode_bulks((len(keys),))
        rest = encode_bulks((*keys[len(fixed) :], *call.args))
        return header + self._head_bulks[call.script] + count + self._fixed_bulks + rest

    async def _send_pipeline(
        self, batch: list[ScriptCall], wait: bool, acked: list[int]
    ) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for call in batch:
                # execute_command, not fcall() or evalsha(): the cluster pipeline refuses the
                # helpers, but routes a raw FCALL or EVALSHA by its keys (all in one slot:
                # check_one_slot).
                head = self._heads[call.script]
                pipe.execute_command(*head, len(call.keys), *call.keys, *call.args)
            if wait:
                # In the same round trip, on the same connection: WAIT counts the replicas
                # that have every write this connection made so far.
                self._wait(pipe, batch[acked[0]].keys[0])
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def _wait(self, pipe: Any, key: str) -> None:
        """Queue WAIT min_replicas timeout; on a cluster, on the node that owns the key."""
        args = ("WAIT", self.min_replicas, self.replicas_timeout_ms)
        if isinstance(self.client, RedisCluster):
            pipe.execute_command(*args, target_nodes=self.client.get_node_from_key(key))
        else:
            pipe.execute_command(*args)

    def _short_of_replicas(self, confirmed: Any, op: str) -> BackendUnavailable | None:
        """None when WAIT's reply reaches min_replicas, else the error its writes get."""
        if isinstance(confirmed, int) and confirmed >= self.min_replicas:
            return None
        # Not durable as asked: the producer must not hear "stored". The write stays on the
        # primary, so the caller answers from the local queue and reconciles the two copies
        # as after a timed-out write.
        # A warning when it turns the daemon to the local queue; the probe's repeats (every
        # backoff step while replicas lag) at debug, like the probe's other failures.
        level = self._log.debug if op == "probe" else self._log.warning
        level("redis_replicas_short", op=op, confirmed=repr(confirmed), needed=self.min_replicas)
        # The counts tell "no replica at all" (a promoted replica) from "one lagging".
        needed = self.min_replicas
        counts = (
            f"{confirmed} of {needed} confirmed"
            if isinstance(confirmed, int)
            else f"WAIT failed, {needed} needed"
        )
        return BackendUnavailable(
            f"redis replicas did not confirm the write ({counts})", {"kind": "replicas"}
        )

    async def probe(self, key: str) -> None:
        """One write (and WAIT, when replicas must confirm); BackendUnavailable unless it holds."""
        with redis_errors():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(key, b"1", px=10_000)
                if self.min_replicas > 0:
                    self._wait(pipe, key)
                replies: list[Any] = await pipe.execute(raise_on_error=True)
        if self.min_replicas > 0:
            short = self._short_of_replicas(replies[-1], "probe")
            if short is not None:
                raise short


async def close_client(client: RedisClient) -> None:
    """Close a client and its connections (a Sentinel-managed one's sentinels included)."""
    await client.aclose()
    # A Sentinel-managed client keeps one client per sentinel, which its aclose leaves open.
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    for sentinel in getattr(manager, "sentinels", ()):
        await sentinel.aclose()


# The first two words of each script's command, by script name.
_FUNCTION_HEADS = {name: ("FCALL", fn) for name, fn in FUNCTION_NAMES.items()}
_SCRIPT_HEADS = {name: ("EVALSHA", sha) for name, sha in SCRIPT_SHAS.items()}


def _functions_refused(exc: ResponseError) -> bool:
    """Whether a FUNCTION LOAD that failed leaves plain scripts to try: no FUNCTION (before
    Redis 7), an ACL that denies it, a full Redis (FUNCTION LOAD needs memory, SCRIPT LOAD
    does not), or a refusal in words of its own (another Redis-compatible server). Not an
    outage (READONLY, LOADING, a lost connection...), which SCRIPT LOAD would meet as well."""
    if isinstance(exc, (NoPermissionError, OutOfMemoryError)):
        return True
    return unavailable_kind(exc) is None


def _settle(replies: Iterable[tuple[ScriptCall, Any]]) -> None:
    """Resolve each call's future with its reply (an error reply as its exception)."""
    for call, reply in replies:
        if call.future.done():
            continue  # its caller was cancelled
        if isinstance(reply, Exception):
            call.future.set_exception(translate_error(reply))
        else:
            call.future.set_result(reply)


def _fail(batch: list[ScriptCall], exc: BaseException) -> None:
    """Every call of a batch that failed as a whole hears of the failure."""
    for call in batch:
        if not call.future.done():
            call.future.set_exception(translate_error(exc))
