#!/usr/bin/env bash
# corral smoke test for CI: start a server, make a tiny model, run it, check `corral ps`, stop.
#
#   scripts/smoke.sh                 uses `corral` and `python3` from PATH
#   CORRAL="python -m supervisor" PYTHON=.venv/bin/python scripts/smoke.sh
#
# Everything lives in a temporary directory (CORRAL_HOME, the Hugging Face
# cache) on a free loopback port, so it never touches your models or a
# running server. Exits non-zero on any failure, printing the server log.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CORRAL="${CORRAL:-corral}"
MODEL="${SMOKE_MODEL:-smoke/tiny}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/corral-smoke.XXXXXX")"
SERVER_PID=""

corral() { $CORRAL "$@"; }  # word-split on purpose: CORRAL may be "python -m supervisor"

cleanup() {
    local rc=$?
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
    if [ "$rc" -ne 0 ] && [ -f "$WORK/server.log" ]; then
        echo "smoke: FAILED (exit $rc); last server log lines:" >&2
        tail -n 40 "$WORK/server.log" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
export CORRAL_HOME="$WORK/home" CORRAL_HOST="127.0.0.1:$PORT" HF_HUB_CACHE="$WORK/hub" HF_HUB_OFFLINE=1
unset CORRAL_API_KEY

echo "smoke: making $MODEL in $HF_HUB_CACHE"
"$PYTHON" "$ROOT/scripts/make_test_model.py" --hf-cache "$HF_HUB_CACHE" --repo "$MODEL" >/dev/null

echo "smoke: starting corral serve on $CORRAL_HOST"
# A plain command, not the function: $! must be the server's own pid, so the
# SIGTERM below reaches the server and not a subshell that would orphan it.
$CORRAL serve >"$WORK/server.log" 2>&1 &
SERVER_PID=$!
echo "smoke: server pid $SERVER_PID"
for _ in $(seq 1 300); do
    if corral list >/dev/null 2>&1; then break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || { echo "smoke: server exited at start" >&2; exit 1; }
    sleep 0.2
done
corral list >/dev/null || { echo "smoke: server did not come up in 60s" >&2; exit 1; }

echo "smoke: corral list"
corral list | tee "$WORK/list.txt"
grep -q "^$MODEL" "$WORK/list.txt" || { echo "smoke: $MODEL not listed" >&2; exit 1; }

echo "smoke: corral run $MODEL"
corral run "$MODEL" "Hello, how are you?" </dev/null >"$WORK/answer.txt"
echo "smoke: answered $(wc -c <"$WORK/answer.txt") bytes"

echo "smoke: corral ps"
corral ps | tee "$WORK/ps.txt"
grep -q "^$MODEL" "$WORK/ps.txt" || { echo "smoke: $MODEL not loaded after run" >&2; exit 1; }

corral stop "$MODEL"
kill -TERM "$SERVER_PID"
server_rc=0; wait "$SERVER_PID" || server_rc=$?
[ "$server_rc" -eq 0 ] || { echo "smoke: server exited with status $server_rc on SIGTERM" >&2; exit 1; }
SERVER_PID=""
echo "smoke: OK"
