"""A backlog drained after an outage, the limiter on and then off: `python -m bench.storm`.

The issue's pacing scenario on real processes (tests/e2e/storm.py runs it; the test suite runs
a bounded slice of it, tests/e2e/test_pacing.py): 2,000 queued requests, two daemons on one
redis-server with two `sidecar work` (concurrency 8) on each, and a fake OpenAI-compatible
provider (tests/support/fake_provider.py) that enforces 600 requests and 60,000 tokens per
minute and answers 429 with Retry-After past them. A gateway (the example service) sends fresh
calls at `--fresh-rate` per second during the drain, and `--idle-fresh` of them one after
another before the backlog arrives: the idle baseline of their latency.

Run 1 tells the fleet the provider's limits (LLM_PROVIDER_RPM/TPM); run 2 sets them to 0,
so the workers drain as fast as they can and learn the limits only from 429s: the storm.
For each run: calls per second at the provider, the 429 share, the busiest 10-second window
against the limit, the drain time over the ideal (work / limit), the fresh calls' answers and
their p50 latency beside the idle one.

    .venv/bin/python -m bench.storm                 # the issue's size: about 12 minutes
    .venv/bin/python -m bench.storm --quick         # 500 requests at 1200 rpm, 10 s windows
    .venv/bin/python -m bench.storm --requests 1000 --rpm 1200 --tpm 120000 --only on
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from bench.tables import markdown_table, note, print_section
from tests.e2e.storm import Storm, StormResult, run_storm


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f} ms"


def _series(per_second: list[int], width: int = 20) -> str:
    """Calls per second, `width` to a line."""
    rows = [per_second[i : i + width] for i in range(0, len(per_second), width)]
    return "\n".join(
        f"{i * width:>4}s: " + " ".join(f"{n:>3}" for n in row) for i, row in enumerate(rows)
    )


def summary_rows(results: list[tuple[str, StormResult]]) -> list[list[str]]:
    rows = []
    for name, r in results:
        calls, tokens = r.window_max()
        limit_calls, limit_tokens = r.storm.window_limits()
        over_calls, over_tokens = r.excess()
        n429 = sum(c.status == 429 for c in r.calls)
        fresh = r.fresh
        rows.append(
            [
                name,
                f"{len(r.calls)}",
                f"{n429} ({r.share_429():.1%})",
                f"{calls} / {limit_calls:g} ({over_calls:+.1%})",
                f"{tokens} / {limit_tokens:g} ({over_tokens:+.1%})",
                f"{r.drain_s:.1f} s / {r.ideal_s():.1f} s = {r.drain_s / r.ideal_s():.2f}x",
                f"{sum(f.status == 200 for f in fresh)} / {len(fresh)}" if fresh else "-",
                _ms(r.p50(fresh)),
                _ms(r.p50(r.idle)),
                ", ".join(f"{k} {v}" for k, v in sorted(r.statuses.items())),
            ]
        )
    return rows


RUNS = ("on", "off", "on + fresh")
HEAD = [
    "limiter",
    "provider calls",
    "429s",
    "busiest 10 s: calls",
    "busiest 10 s: tokens",
    "drain / ideal",
    "fresh 200",
    "fresh p50 (drain)",
    "fresh p50 (idle)",
    "requests",
]


QUICK = {"requests": 500, "rpm": 1200, "tpm": 120_000, "window": 10.0, "fresh_backlog": 200}
FULL = {"requests": 2000, "rpm": 600, "tpm": 60_000, "window": 60.0, "fresh_backlog": 500}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, help="the backlog (2000)")
    parser.add_argument("--rpm", type=int, help="the provider's requests per minute (600)")
    parser.add_argument("--tpm", type=int, help="its tokens per minute (60000)")
    parser.add_argument("--window", type=float, help="the fake provider's window, s (60)")
    parser.add_argument("--fresh-backlog", type=int, help="the backlog of the fresh run (500)")
    parser.add_argument("--fresh-rate", type=float, default=1.0, help="fresh calls/s (1)")
    parser.add_argument("--idle-fresh", type=int, default=20, help="fresh calls before (20)")
    parser.add_argument("--only", choices=RUNS, action="append", help="these runs only")
    parser.add_argument("--quick", action="store_true", help="500 requests, 1200 rpm, 10 s")
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    size.update({k: getattr(args, k) for k in size if getattr(args, k) is not None})
    base = Storm(
        requests=int(size["requests"]),
        rpm=int(size["rpm"]),
        tpm=int(size["tpm"]),
        provider_window_s=float(size["window"]),
    )
    storms = {
        "on": base,
        "off": dataclasses.replace(base, limiter=False),
        # The fresh run: a smaller backlog, with fresh calls during it (and the idle ones).
        "on + fresh": dataclasses.replace(
            base,
            requests=int(size["fresh_backlog"]),
            fresh_rate=args.fresh_rate,
            idle_fresh=args.idle_fresh,
        ),
    }
    results: list[tuple[str, StormResult]] = []
    for name, storm in storms.items():
        if args.only and name not in args.only:
            continue
        note(
            f"storm, limiter {name}: {storm.requests} requests, {storm.rpm} rpm / "
            f"{storm.tpm} tpm per {storm.provider_window_s:g} s window, ideal {storm.ideal_s:.0f} s"
        )
        with tempfile.TemporaryDirectory(prefix="st", dir="/tmp") as tmp:
            result = run_storm(storm, Path(tmp), progress=note)
        results.append((name, result))
        print_section(
            f"storm, limiter {name}: calls per second at the provider",
            "```\n" + _series(result.per_second()) + "\n```",
        )
    print_section("storm: limiter on beside off", markdown_table(HEAD, summary_rows(results)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
