"""`sidecar list`, `show`, `requeue` and `purge` through the real CLI against the real daemon,
and the operators' ops' bad input answered with a clear error by the real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest

from sidecar.client import Client
from sidecar.errors import SidecarError
from tests.support.daemon import Daemon, running_daemon

CLI_TIMEOUT_S = 30


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """The real `sidecar` command (stdin not a terminal), its exit code and output."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "--socket", daemon.socket_path, *args],
        capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip


@pytest.fixture(scope="module")
def daemon() -> Iterator[Daemon]:
    with running_daemon() as d:
        yield d


def _dead_letters(client: Client, *names: str) -> None:
    """Requests failed for good (a fail without retry)."""
    for name in names:
        client.enqueue({"n": name}, queue_id=name, priority=3)
        [job] = client.dequeue(1)
        assert job.queue_id == name
        client.fail(name, job.lease_id, "bad input", retry=False)


def test_list_show_requeue_and_purge(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client:
        _dead_letters(client, "cli-d1", "cli-d2", "cli-d3")
        client.enqueue({"n": "q"}, queue_id="cli-q1")
    out = cli(daemon, "list", "failed", "--json", "--payload")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert [i["queue_id"] for i in listed["items"]] == ["cli-d1", "cli-d2", "cli-d3"]
    assert listed["items"][0]["store"] == "local"
    assert listed["items"][0]["payload"] == {"n": "cli-d1"}
    assert listed["items"][0]["reason"] == "bad input"

    table = cli(daemon, "list", "failed", "--limit", "2")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["QUEUE_ID", "STORE", "STATUS"]
    assert [r.split()[0] for r in rows] == ["cli-d1", "cli-d2"]
    assert header.index("STORE") == rows[0].index("local")  # aligned columns
    assert "--cursor" in table.stderr  # a next page, and how to get it

    shown = cli(daemon, "show", "cli-d1", "--json", "--payload")
    assert json.loads(shown.stdout)["payload"] == {"n": "cli-d1"}
    assert "attempts" in cli(daemon, "show", "cli-d1").stdout

    # One id: no question asked. Twice: a no-op that says so.
    one = cli(daemon, "requeue", "cli-d1")
    assert one.returncode == 0 and one.stdout.strip() == "requeued 1", one.stderr
    again = cli(daemon, "requeue", "cli-d1")
    assert "queued already" in again.stdout

    # By filter, off a terminal: refused without --yes, done with it.
    refused = cli(daemon, "requeue", "--status", "failed")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    done = cli(daemon, "requeue", "--status", "failed", "--yes", "--json")
    assert json.loads(done.stdout)["ids"] == ["cli-d2", "cli-d3"]

    refused = cli(daemon, "purge", "queued", "--force")
    assert refused.returncode == 1 and "--yes" in refused.stderr
    no_force = cli(daemon, "purge", "queued", "--yes")
    assert no_force.returncode == 1 and "invalid_state" in no_force.stderr
    assert "force" in no_force.stderr
    purged = cli(daemon, "purge", "queued", "--yes", "--force")
    assert purged.stdout.strip() == "purged 4", purged.stderr
    assert json.loads(cli(daemon, "list", "queued", "--json").stdout)["items"] == []
    daemon.wait_for_event("records_purged")
    logged = daemon.events("records_purged")[-1]
    assert logged["count"] == 4 and isinstance(logged["peer_uid"], int)


def test_bad_input_gets_a_clear_error_and_the_daemon_carries_on(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client:
        _dead_letters(client, "bad-1", "bad-2")
        cases: dict[str, Callable[[], object]] = {
            "unknown status": lambda: client.list("lost"),
            "limit out of range": lambda: client.list("failed", limit=100_000),
            "damaged cursor": lambda: client.list("failed", cursor="not-a-cursor!"),
            "purge queued without force": lambda: client.purge("queued"),
        }
        codes = {}
        for name, call in cases.items():
            with pytest.raises(SidecarError) as err:
                call()
            codes[name] = (err.value.code, err.value.message)
        assert codes["unknown status"][0] == "invalid_message"
        assert "queued, delayed, processing" in codes["unknown status"][1]
        assert codes["limit out of range"][0] == "invalid_message"
        assert codes["damaged cursor"] == (
            "bad_cursor",
            "the cursor is damaged (not as this daemon made it); list again without a cursor",
        )
        assert codes["purge queued without force"][0] == "invalid_state"
        assert "force" in codes["purge queued without force"][1]

        page = client.list("failed", limit=1)
        assert page.next_cursor is not None
        tampered = page.next_cursor[:-2] + ("AA" if page.next_cursor[-2:] != "AA" else "BB")
        with pytest.raises(SidecarError) as err:
            client.list("failed", limit=1, cursor=tampered)
        assert err.value.code == "bad_cursor"
        with pytest.raises(SidecarError) as err:
            client.list("expired", limit=1, cursor=page.next_cursor)  # other filters
        assert err.value.code == "bad_cursor" and "status failed" in err.value.message
        # The connection, and the daemon, carry on.
        assert client.list("failed", limit=1, cursor=page.next_cursor).items
        assert client.stats().dead_letters >= 1

    # A cursor from another daemon.
    with running_daemon() as other, Client(other.socket_path) as there:
        with pytest.raises(SidecarError) as err:
            there.list("failed", limit=1, cursor=page.next_cursor)
        assert err.value.code == "bad_cursor"
        assert "another daemon" in err.value.message


def test_payloads_refused_when_the_daemon_does_not_allow_them() -> None:
    with running_daemon(SIDECAR_OPS_PAYLOADS="false") as d, Client(d.socket_path) as client:
        _dead_letters(client, "p-1")
        for call in (
            lambda: client.list("failed", payload=True),
            lambda: client.status("p-1", payload=True),
        ):
            with pytest.raises(SidecarError) as err:
                call()
            assert err.value.code == "forbidden"
            assert "SIDECAR_OPS_PAYLOADS" in err.value.message
        [item] = client.list("failed").items  # metadata still
        assert item.queue_id == "p-1"
        out = cli(d, "show", "p-1", "--payload")
        assert out.returncode == 1 and "forbidden" in out.stderr


def test_the_ops_take_a_named_queue(daemon: Daemon) -> None:
    with Client(daemon.socket_path) as client:
        served = client.hello().queues
        other = next((q for q in served if q != "requests"), None)
        if other is not None:  # the outbox queues: their own records, their own dead letters
            assert client.list("failed", queue=other).items == []
            assert client.purge("completed", queue=other).purged == 0
        with pytest.raises(SidecarError) as err:
            client.list("failed", queue="nowhere")
        assert err.value.code == "unknown_queue"
    out = cli(daemon, "list", "queued", "--queue", "nowhere")
    assert out.returncode == 1 and "unknown_queue" in out.stderr
