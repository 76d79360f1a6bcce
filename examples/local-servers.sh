#!/usr/bin/env bash
# The local servers the README's later sections talk to, in the background of the shell
# that runs this, so that the README needs two terminals only (make run's, and yours):
#
#   - the local Chat Completions server, tests/fakes/openai_server.py, with its echo model
#     (docs/local-model.md), on http://127.0.0.1:$MODEL_PORT/v1 (8400);
#   - the local audio server, tests/fakes/audio_server.py (speech recognized by PocketSphinx,
#     spoken by eSpeak NG; docs/local-model.md, "Local audio"), on
#     http://127.0.0.1:$AUDIO_PORT/v1 (8091);
#   - the MCP reference server (make tools installs it) on http://127.0.0.1:$MCP_PORT/mcp
#     (3001), bound to loopback by tests/mcp/loopback.mjs: one of its tools answers with its
#     whole environment, so it must stay off any network.
#
#   examples/local-servers.sh start   start each that is not running, and wait until all answer
#   examples/local-servers.sh stop    stop them
#
# Their logs and process ids are in .local/ (model.log, mcp.log, audio.log, *.pid).
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.local
MODEL_PORT=${MODEL_PORT:-8400}
MCP_PORT=${MCP_PORT:-3001}
AUDIO_PORT=${AUDIO_PORT:-8091}
# How long a server may take to answer before start gives up on it.
START_TIMEOUT_S=${START_TIMEOUT_S:-60}

# What each server's command line holds: a pid file whose process is something else (the
# pid was reused after a reboot) does not count as running, and is never stopped. `ps -ww`:
# without it ps cuts the line at $COLUMNS (80 under pytest-xdist), before the name.
command_of() {
    case $1 in
    model) echo tests.fakes.openai_server ;;
    mcp) echo server-everything ;;
    audio) echo tests.fakes.audio_server ;;
    esac
}

running() {
    local pid args
    [[ -s $DIR/$1.pid ]] || return 1
    pid=$(<"$DIR/$1.pid")
    [[ $pid =~ ^[0-9]+$ ]] && args=$(ps -ww -o args= -p "$pid" 2>/dev/null) &&
        [[ $args == *"$(command_of "$1")"* ]]
}

# Wait until the log says the server listens; fail with its log if it ends or takes too long.
# Alive, not `running`: a server just started may not have replaced the subshell that starts
# it yet (its command line is still this script's), which is no reason to give up on it.
await_ready() {
    local name=$1 ready=$2 deadline=$((SECONDS + START_TIMEOUT_S)) pid
    pid=$(<"$DIR/$name.pid")
    until grep -qE -- "$ready" "$DIR/$name.log"; do
        if ! kill -0 "$pid" 2>/dev/null || ((SECONDS > deadline)); then
            echo "local-servers: $name did not start; its log ($DIR/$name.log):" >&2
            tail -n 20 "$DIR/$name.log" >&2
            return 1
        fi
        sleep 0.1
    done
}

start() {
    mkdir -p -m 700 "$DIR"
    if running model; then
        echo "model: already running (pid $(<"$DIR/model.pid"))"
    else
        .venv/bin/python -m tests.fakes.openai_server --port "$MODEL_PORT" \
            >"$DIR/model.log" 2>&1 &
        echo $! >"$DIR/model.pid"
    fi
    if running mcp; then
        echo "mcp: already running (pid $(<"$DIR/mcp.pid"))"
    else
        (cd tests/mcp && PORT=$MCP_PORT exec node --import ./loopback.mjs \
            node_modules/@modelcontextprotocol/server-everything/dist/index.js streamableHttp) \
            >"$DIR/mcp.log" 2>&1 &
        echo $! >"$DIR/mcp.pid"
    fi
    if running audio; then
        echo "audio: already running (pid $(<"$DIR/audio.pid"))"
    else
        .venv/bin/python -m tests.fakes.audio_server --port "$AUDIO_PORT" \
            >"$DIR/audio.log" 2>&1 &
        echo $! >"$DIR/audio.pid"
    fi
    await_ready model '^http://'
    await_ready mcp "listening on port $MCP_PORT"
    await_ready audio '^http://'
    echo "model: http://127.0.0.1:$MODEL_PORT/v1 (the echo model; log $DIR/model.log)"
    echo "mcp:   http://127.0.0.1:$MCP_PORT/mcp (log $DIR/mcp.log)"
    echo "audio: http://127.0.0.1:$AUDIO_PORT/v1 (speech in and out; log $DIR/audio.log)"
}

stop() {
    local name pid
    for name in model mcp audio; do
        if running "$name"; then
            pid=$(<"$DIR/$name.pid")
            kill "$pid"
            # Gone before this returns: a start right after must find the port free.
            local deadline=$((SECONDS + 10))
            while kill -0 "$pid" 2>/dev/null; do
                ((SECONDS <= deadline)) || kill -KILL "$pid" 2>/dev/null || true
                sleep 0.05
            done
            echo "$name: stopped"
        fi
        rm -f "$DIR/$name.pid"
    done
}

case ${1:-} in
start) start ;;
stop) stop ;;
*)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
