#!/usr/bin/env bash
# The main job from a fresh checkout: install corral into .venv, generate a
# small random-weight model into a demo Hugging Face cache, start `corral serve`
# and ask the model something. The server then keeps running (Ctrl-C stops it).
#
# With a real model already in your Hugging Face cache (e.g. after
# `corral pull mlx-community/Qwen3-0.6B-4bit`), set DEMO_MODEL to its repo id.
set -euo pipefail
cd "$(dirname "$0")/.."
export CORRAL_HOST="${CORRAL_HOST:-127.0.0.1:11434}"
# Another server on the port would answer in place of this one: stop before anything else.
if ! python3 - "$CORRAL_HOST" <<'PY'
import socket, sys
host, _, port = sys.argv[1].removeprefix("http://").rstrip("/").rpartition(":")
with socket.socket() as s:
    sys.exit(0 if s.connect_ex((host.strip("[]") or "127.0.0.1", int(port))) != 0 else 1)
PY
then
    echo "demo: $CORRAL_HOST is already in use (another corral or ollama?); stop it or set CORRAL_HOST=127.0.0.1:PORT" >&2
    exit 1
fi
VENV="${CORRAL_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
export PATH="$PWD/$VENV/bin:$PATH"
export CORRAL_HOME="${CORRAL_HOME:-$PWD/.demo/home}"
MODEL="${DEMO_MODEL:-corral-demo/tiny-llama}"
if [ -z "${DEMO_MODEL:-}" ]; then
    # A random-weight model rarely says its end token: a short window keeps
    # its answers short (generation ends with done_reason "length" there).
    export CORRAL_CONTEXT_LENGTH="${CORRAL_CONTEXT_LENGTH:-256}"
    export HF_HUB_CACHE="${HF_HUB_CACHE:-$PWD/.demo/hub}"
    [ -d "$HF_HUB_CACHE/models--corral-demo--tiny-llama" ] ||
        python scripts/make_test_model.py --hf-cache "$HF_HUB_CACHE" --repo "$MODEL" --hidden 256 --layers 4 >/dev/null
fi
mkdir -p "$CORRAL_HOME"
LOG="$CORRAL_HOME/serve.log"
# The server's log goes to a file so it never interleaves with the commands' output below.
corral serve >"$LOG" 2>&1 &
SERVER=$!
stop_server() { kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; }
trap stop_server EXIT
trap 'echo; echo "--- stopped"; exit 0' INT TERM  # Ctrl-C is how the demo ends: not a failure
for _ in $(seq 1 100); do
    curl -fs "http://$CORRAL_HOST/" >/dev/null 2>&1 && break
    if ! kill -0 "$SERVER" 2>/dev/null; then
        echo "demo: corral serve exited; its log ($LOG):" >&2
        tail -n 20 "$LOG" >&2
        exit 1
    fi
    sleep 0.2
done
echo "--- server log: $LOG"
echo "--- corral list"; corral list
echo "--- corral run $MODEL 'Hello'"; corral run "$MODEL" "Hello" --verbose
echo "--- corral ps"; corral ps
echo "--- server running at http://$CORRAL_HOST (Ctrl-C to stop)"
wait "$SERVER" || true
