"""`sidecar list`, `show`, `requeue` and `purge`: aligned tables for people, `--json` for
scripts. A purge, and a requeue by filter, ask on a terminal and need `--yes` otherwise."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import msgspec

from sidecar.client import Client
from sidecar.protocol import DEFAULT_QUEUE, MAX_LIST_LIMIT, RequestDetail

EXIT_OK = 0
EXIT_ERROR = 1
STATUSES = ("queued", "delayed", "processing", "failed", "completed", "expired")
DEAD = ("failed", "expired")
FINISHED = ("completed", "failed", "expired")
_COLUMNS = ("QUEUE_ID", "STORE", "STATUS", "PRI", "ATTEMPTS", "AGE", "UPDATED", "REASON")
Confirm = Callable[[str], bool]


def format_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Columns aligned to their widest cell, two spaces apart; the last one left ragged."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _age(seconds: float) -> str:
    """A duration as people read it: 42s, 7m, 3h, 2d."""
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _row(item: RequestDetail, now: float) -> list[str]:
    return [
        item.queue_id, item.store, item.status, str(item.priority),
        f"{item.attempts}/{item.max_attempts}", _age(now - item.created_at),
        _age(now - item.updated_at) + " ago", item.reason or "",
    ]  # fmt: skip


def _json_view(item: RequestDetail) -> dict[str, Any]:
    view: dict[str, Any] = msgspec.structs.asdict(item)
    if isinstance(item.payload, msgspec.Raw):
        view["payload"] = msgspec.msgpack.decode(item.payload)
    else:
        view.pop("payload")
    return view


def _dump(value: object) -> str:
    return msgspec.json.encode(value).decode()


def _list(client: Client, args: argparse.Namespace) -> int:
    cursor = args.cursor
    items: list[RequestDetail] = []
    while True:
        page = client.list(
            args.status, queue=args.queue, priority=args.priority,
            order="newest" if args.newest else "oldest", limit=args.limit, cursor=cursor,
            payload=args.payload,
        )  # fmt: skip
        items += page.items
        cursor = page.next_cursor
        if not args.all or cursor is None:
            break
    if args.json:
        print(_dump({"items": [_json_view(i) for i in items], "next_cursor": cursor}))
        return EXIT_OK
    now = time.time()
    if items:
        print(format_table([_row(i, now) for i in items], _COLUMNS))
    else:
        print(f"no {args.status} requests")
    if cursor is not None:
        print(f"more: sidecar list {args.status} --cursor {cursor}", file=sys.stderr)
    return EXIT_OK


def _show(client: Client, args: argparse.Namespace) -> int:
    info = client.status(args.queue_id, payload=args.payload, queue=args.queue)
    if args.json:
        print(_dump(_json_view(info)))
        return EXIT_OK
    view = _json_view(info)
    payload = view.pop("payload", None)
    for name in ("created_at", "updated_at", "expires_at", "lease_expires_at"):
        if view.get(name) is not None:
            view[name] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(view[name]))
    rows = [[k, "" if v is None else str(v)] for k, v in view.items()]
    print(format_table(rows, ("FIELD", "VALUE")))
    if args.payload:
        print("payload:")
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
    return EXIT_OK


def _confirmed(args: argparse.Namespace, what: str, confirm: Confirm) -> bool:
    """--yes, or a yes typed on a terminal; never a silent go-ahead in a script."""
    if args.yes:
        return True
    if not sys.stdin.isatty():
        print(f"error: {what}: refused without --yes (not asked: stdin is not a terminal)",
              file=sys.stderr)  # fmt: skip
        return False
    return confirm(f"{what}? [y/N] ")


def _ask(prompt: str, stream: TextIO = sys.stdin) -> bool:
    print(prompt, end="", flush=True, file=sys.stderr)
    return stream.readline().strip().lower() in ("y", "yes")


def _requeue(client: Client, args: argparse.Namespace) -> int:
    if args.queue_id is None:
        what = f"requeue up to {args.limit} {args.status} dead letters"
        if args.priority is not None:
            what += f" of priority {args.priority}"
        if not _confirmed(args, what, args.confirm):
            return EXIT_ERROR
    res = client.requeue(
        args.queue_id, queue=args.queue, status=args.status, priority=args.priority,
        limit=args.limit,
    )  # fmt: skip
    if args.json:
        print(_dump(res))
    else:
        print(f"requeued {res.requeued}")
        for qid in res.unchanged:
            print(f"{qid}: queued already, unchanged")
    return EXIT_OK


def _purge(client: Client, args: argparse.Namespace) -> int:
    what = f"purge {'all' if args.older_than_s is None else 'older'} {args.status} requests"
    if args.older_than_s is not None:
        what += f" (older than {_age(args.older_than_s)})"
    if not _confirmed(args, what, args.confirm):
        return EXIT_ERROR
    res = client.purge(
        args.status, queue=args.queue, older_than_s=args.older_than_s, force=args.force
    )
    print(_dump(res) if args.json else f"purged {res.purged}")
    return EXIT_OK


def _queue_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queue", default=DEFAULT_QUEUE,
                   help="the named queue: requests (default), deliveries or pickups")  # fmt: skip
    p.add_argument("--json", action="store_true", help="JSON, for scripts")


def add_operator_commands(sub: Any, confirm: Confirm = _ask) -> None:
    """Add list, show, requeue and purge to the CLI's subparsers; each sets `run`."""
    p = sub.add_parser("list", help="list requests of one status, oldest first (a page)")
    p.add_argument("status", nargs="?", default="failed", choices=STATUSES,
                   help="which requests (default: failed)")  # fmt: skip
    p.add_argument("--priority", type=int, default=None, help="only this priority (0-9)")
    p.add_argument("--newest", action="store_true", help="newest first")
    p.add_argument("--limit", type=int, default=50,
                   help=f"requests per page (1-{MAX_LIST_LIMIT}, default 50)")  # fmt: skip
    p.add_argument("--cursor", default=None, help="the next page, as the last one printed")
    p.add_argument("--all", action="store_true", help="follow the cursor to the last page")
    p.add_argument("--payload", action="store_true", help="with payloads (--json only)")
    _queue_option(p)
    p.set_defaults(run=_list)

    p = sub.add_parser("show", help="one request: metadata, reason, attempts, times")
    p.add_argument("queue_id")
    p.add_argument("--payload", action="store_true", help="with its payload, when allowed")
    _queue_option(p)
    p.set_defaults(run=_show)

    p = sub.add_parser(
        "requeue", help="put dead letters back in the queue (attempts reset): one by id, or "
        "by filter (asks, or --yes)",
    )  # fmt: skip
    p.add_argument("queue_id", nargs="?", default=None, help="the one to requeue")
    p.add_argument("--status", default="failed", choices=DEAD,
                   help="by filter: which dead letters (default failed)")  # fmt: skip
    p.add_argument("--priority", type=int, default=None, help="by filter: only this priority")
    p.add_argument("--limit", type=int, default=100, help="by filter: at most this many")
    p.add_argument("--yes", action="store_true", help="do not ask (needed off a terminal)")
    _queue_option(p)
    p.set_defaults(run=_requeue, confirm=confirm)

    p = sub.add_parser("purge", help="forget requests of one status (asks, or --yes)")
    p.add_argument("status", choices=STATUSES)
    p.add_argument("--older-than", dest="older_than_s", type=float, default=None,
                   metavar="SECONDS", help="only those finished (or, live, arrived) this long "
                   "ago or more")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="needed for queued, delayed or processing requests")  # fmt: skip
    p.add_argument("--yes", action="store_true", help="do not ask (needed off a terminal)")
    _queue_option(p)
    p.set_defaults(run=_purge, confirm=confirm)
