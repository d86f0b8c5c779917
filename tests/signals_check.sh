#!/usr/bin/env bash
# The tests that signal the processes they start, run the way a background job of a
# non-interactive shell runs them (`cmd &` in a script, nohup, some CI runners): with SIGINT
# ignored. An ignored signal stays ignored across fork and exec, so these tests pass only if
# they give their children the default dispositions (tests/support/procs.py) instead of
# inheriting the suite's. Exits non-zero when they fail, or when pytest did not really start
# with SIGINT ignored. Takes about 40 s.
#   bash tests/signals_check.sh            # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

# The CLI's watch (SIGINT, SIGTERM), the daemon's drain on SIGTERM and SIGINT (a second signal
# during the drain), a SIGTERM restart on Redis, and the LLM worker and app stopped by SIGTERM.
files=(
    tests/daemon/test_cli_watch.py
    tests/daemon/test_daemon.py
    tests/server/test_systemd.py
    tests/queue/local/test_crash.py
    tests/daemon/test_daemon_redis.py
    tests/llm/test_llm_e2e.py
)
select="test_cli_watch or sigterm or signal or fresh_queued_refused_and_nothing_lost"

# `trap '' INT` sets SIGINT to SIG_IGN in the subshell; exec keeps it ignored in pytest.
(trap '' INT; exec .venv/bin/python -m pytest -p no:cacheprovider -q "${files[@]}" -k "$select" "$@") &
pid=$!
# Ours is a background job: stop it with the script (it ignores SIGINT, not SIGTERM).
trap 'kill -TERM "$pid" 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Check pytest itself, once the subshell has become it (a bounded poll of its command line).
ignored=""
for _ in $(seq 200); do
    state=$(awk '/^State:/ {print $2}' "/proc/$pid/status" 2>/dev/null || true)
    if [ -z "$state" ] || [ "$state" = Z ]; then
        break  # it ended already
    fi
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- '-m pytest'; then
        ignored=$(awk '/^SigIgn:/ {print $2}' "/proc/$pid/status")
        break
    fi
    sleep 0.05
done
if [ -z "$ignored" ] || (( (16#$ignored & 2) == 0 )); then  # bit 1: signal 2, SIGINT
    echo "signals_check: could not see pytest (pid $pid) run with SIGINT ignored" \
         "(SigIgn=${ignored:-unknown}): the check proves nothing" >&2
    exit 1  # the EXIT trap stops it
fi
echo "signals_check: pytest (pid $pid) runs with SigIgn=$ignored: SIGINT ignored" >&2

code=0
wait "$pid" || code=$?
trap - EXIT
if [ "$code" != 0 ]; then
    echo "signals_check: the signal tests failed (exit $code) with SIGINT ignored" >&2
fi
exit "$code"
