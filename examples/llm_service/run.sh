#!/usr/bin/env bash
# Start the sidecar daemon, the example service (http://127.0.0.1:${PORT:-8000}) and one worker
# together, on the mock provider unless LLM_PROVIDER says otherwise; Ctrl-C stops all three.
set -euo pipefail
cd "$(dirname "$0")/../.."
export SIDECAR_SOCKET="${SIDECAR_SOCKET:-/tmp/sidecar-llm-demo-$(id -u).sock}"
export SIDECAR_STATE_DIR="${SIDECAR_STATE_DIR:-/tmp/sidecar-llm-demo-$(id -u).state}"
export ENVIRONMENT="${ENVIRONMENT:-development}"
trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT INT TERM
.venv/bin/sidecar serve &
for _ in $(seq 100); do [ -S "$SIDECAR_SOCKET" ] && break; sleep 0.1; done
.venv/bin/sidecar work &
.venv/bin/python -m uvicorn examples.llm_service.app:app --host 127.0.0.1 --port "${PORT:-8000}" &
wait
