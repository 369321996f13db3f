#!/usr/bin/env bash
# The main job from a fresh checkout: install corral into .venv, generate a
# small random-weight model into a demo Hugging Face cache, start `corral serve`
# and ask the model something. The server then keeps running (Ctrl-C stops it).
#
# With a real model already in your Hugging Face cache (e.g. after
# `corral pull mlx-community/Qwen3-0.6B-4bit`), set DEMO_MODEL to its repo id.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${CORRAL_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -e .
export PATH="$PWD/$VENV/bin:$PATH"
export CORRAL_HOME="${CORRAL_HOME:-$PWD/.demo/home}"
export CORRAL_HOST="${CORRAL_HOST:-127.0.0.1:11434}"
MODEL="${DEMO_MODEL:-corral-demo/tiny-llama}"
if [ -z "${DEMO_MODEL:-}" ]; then
    # A random-weight model rarely says its end token: a short window keeps
    # its answers short (generation ends with done_reason "length" there).
    export CORRAL_CONTEXT_LENGTH="${CORRAL_CONTEXT_LENGTH:-256}"
    export HF_HUB_CACHE="${HF_HUB_CACHE:-$PWD/.demo/hub}"
    [ -d "$HF_HUB_CACHE/models--corral-demo--tiny-llama" ] ||
        python scripts/make_test_model.py --hf-cache "$HF_HUB_CACHE" --repo "$MODEL" --hidden 256 --layers 4 >/dev/null
fi
corral serve &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do
    curl -fs "http://$CORRAL_HOST/" >/dev/null 2>&1 && break
    sleep 0.2
done
echo "--- corral list"; corral list
echo "--- corral run $MODEL 'Hello'"; corral run "$MODEL" "Hello" --verbose
echo "--- corral ps"; corral ps
echo "--- server running at http://$CORRAL_HOST (Ctrl-C to stop)"
wait $SERVER
