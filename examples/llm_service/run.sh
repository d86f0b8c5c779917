#!/usr/bin/env bash
# Start the sidecar daemon, the example service (http://127.0.0.1:${PORT:-8000}) and one worker
# together, on the mock provider unless LLM_PROVIDER says otherwise; Ctrl-C stops all three.
#
# It runs with the python that has sidecar installed, with the llm and examples extras
# (pip install -e '.[llm,examples]'), the first of: $PYTHON, the active virtualenv
# ($VIRTUAL_ENV), python3 or python on PATH, the repository's .venv.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"

candidates=()
[ -n "${PYTHON:-}" ] && candidates+=("$PYTHON")
[ -n "${VIRTUAL_ENV:-}" ] && candidates+=("$VIRTUAL_ENV/bin/python")
for name in python3 python; do
    found="$(command -v "$name" 2>/dev/null)" && candidates+=("$found")
done
candidates+=("$repo/.venv/bin/python")

# -I: isolated, so the checkout in the current folder does not count as installed.
python=""
without_extras=""
for candidate in "${candidates[@]}"; do
    [ -x "$candidate" ] || continue
    (cd / && "$candidate" -I -c 'import sidecar') >/dev/null 2>&1 || continue
    if (cd / && "$candidate" -I -c 'import httpx, fastapi, uvicorn') >/dev/null 2>&1; then
        python="$candidate"
        break
    fi
    [ -n "$without_extras" ] || without_extras="$candidate"
done
if [ -z "$python" ]; then
    if [ -n "$without_extras" ]; then
        echo "run.sh: $without_extras has sidecar but not the llm and examples extras; install them:" >&2
        echo "  $without_extras -m pip install -e '$repo[llm,examples]'" >&2
    else
        echo "run.sh: sidecar is not installed for any python tried (${candidates[*]}); install it:" >&2
        echo "  python3 -m venv $repo/.venv && $repo/.venv/bin/pip install -e '$repo[llm,examples]'" >&2
        echo "then run this again, or set PYTHON to the python of the virtualenv that has it." >&2
    fi
    exit 2
fi
echo "run.sh: using $python" >&2

cd "$repo"  # the example app is imported as examples.llm_service.app
export SIDECAR_SOCKET="${SIDECAR_SOCKET:-/tmp/sidecar-llm-demo-$(id -u).sock}"
export SIDECAR_STATE_DIR="${SIDECAR_STATE_DIR:-/tmp/sidecar-llm-demo-$(id -u).state}"
export ENVIRONMENT="${ENVIRONMENT:-development}"
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM
"$python" -m sidecar serve &
for _ in $(seq 100); do [ -S "$SIDECAR_SOCKET" ] && break; sleep 0.1; done
"$python" -m sidecar work &
"$python" -m uvicorn examples.llm_service.app:app --host 127.0.0.1 --port "${PORT:-8000}" &
wait
