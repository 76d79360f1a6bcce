#!/usr/bin/env bash
# The local servers the README's later sections talk to, in the background of the shell
# that runs this, so that the README needs two terminals only (make run's, and yours):
#
#   - the local Chat Completions server, tests/fakes/openai_server.py, with its echo model
#     (docs/local-model.md), on http://127.0.0.1:$MODEL_PORT/v1 (8400);
#   - the local audio server, tests/fakes/audio_server.py (speech recognized by PocketSphinx,
#     spoken by eSpeak NG; docs/local-model.md, "Local audio"), on
#     http://127.0.0.1:$AUDIO_PORT/v1 (8091);
#   - the local embeddings server, tests/fakes/embeddings_server.py (the sentence model
#     all-minilm-l6-v2 in numpy, and deterministic stand-ins; docs/semantic.md), on
#     http://127.0.0.1:$EMBEDDINGS_PORT/v1 (8092);
#   - a webhook receiver, examples/webhook_receiver.py, on http://127.0.0.1:$HOOK_PORT/hook
#     (8090): it verifies each delivery's signature with the secret in .local/hook.secret
#     (made on its first start; the README's webhook is created with it) and logs it;
#   - the MCP reference server (make tools installs it) on http://127.0.0.1:$MCP_PORT/mcp
#     (3001), bound to loopback by tests/mcp/loopback.mjs: one of its tools answers with its
#     whole environment, so it must stay off any network.
#
#   examples/local-servers.sh start   start each that is not running, and wait until all answer
#   examples/local-servers.sh stop    stop them
#
# Their logs and process ids are in .local/ (model.log, mcp.log, audio.log, embeddings.log,
# hook.log, *.pid). `make tools` installs what they need.
set -euo pipefail
cd "$(dirname "$0")/.."

DIR=.local
MODEL_PORT=${MODEL_PORT:-8400}
MCP_PORT=${MCP_PORT:-3001}
AUDIO_PORT=${AUDIO_PORT:-8091}
EMBEDDINGS_PORT=${EMBEDDINGS_PORT:-8092}
HOOK_PORT=${HOOK_PORT:-8090}
SERVERS=(model mcp audio embeddings hook)
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
    embeddings) echo tests.fakes.embeddings_server ;;
    hook) echo examples/webhook_receiver.py ;;
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

# Start server $1 with the command that follows, unless it runs already.
launch() {
    local name=$1
    shift
    if running "$name"; then
        echo "$name: already running (pid $(<"$DIR/$name.pid"))"
    else
        "$@" >"$DIR/$name.log" 2>&1 &
        echo $! >"$DIR/$name.pid"
    fi
}

mcp_server() {
    cd tests/mcp && PORT=$MCP_PORT exec node --import ./loopback.mjs \
        node_modules/@modelcontextprotocol/server-everything/dist/index.js streamableHttp
}

start() {
    mkdir -p -m 700 "$DIR"
    if [[ ! (-e .venv/.local-stamp || -e .venv/.installed-stamp) ||
        ! -f tests/mcp/node_modules/@modelcontextprotocol/server-everything/dist/index.js ]]; then
        echo "local-servers: run \`make tools\` first (it installs what these servers need)" >&2
        return 1
    fi
    launch model .venv/bin/python -m tests.fakes.openai_server --port "$MODEL_PORT"
    launch mcp mcp_server
    launch audio .venv/bin/python -m tests.fakes.audio_server --port "$AUDIO_PORT"
    launch embeddings .venv/bin/python -m tests.fakes.embeddings_server --port "$EMBEDDINGS_PORT"
    launch hook .venv/bin/python examples/webhook_receiver.py --port "$HOOK_PORT" \
        --secret-file "$DIR/hook.secret"
    await_ready model '^http://'
    await_ready mcp "listening on port $MCP_PORT"
    await_ready audio '^http://'
    await_ready embeddings '^http://'
    await_ready hook '^http://'
    echo "model:      http://127.0.0.1:$MODEL_PORT/v1 (the echo model; log $DIR/model.log)"
    echo "mcp:        http://127.0.0.1:$MCP_PORT/mcp (log $DIR/mcp.log)"
    echo "audio:      http://127.0.0.1:$AUDIO_PORT/v1 (speech in and out; log $DIR/audio.log)"
    echo "embeddings: http://127.0.0.1:$EMBEDDINGS_PORT/v1 (all-minilm-l6-v2; log $DIR/embeddings.log)"
    echo "hook:       http://127.0.0.1:$HOOK_PORT/hook (its secret in $DIR/hook.secret; deliveries in $DIR/hook.log)"
}

# Whether the process still holds anything: a zombie (ended, not yet reaped by whoever
# inherited it, which can take a second) has closed its ports already.
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]
}

stop() {
    local name pid
    local -A stopping=()
    # Every server is asked first and then all are waited for: one at a time, each
    # server's exit would add to the next one's.
    for name in "${SERVERS[@]}"; do
        if running "$name"; then
            pid=$(<"$DIR/$name.pid")
            kill "$pid"
            stopping[$name]=$pid
        fi
    done
    # Gone before this returns: a start right after must find the ports free.
    local deadline=$((SECONDS + 10))
    for name in "${SERVERS[@]}"; do
        if [[ -n ${stopping[$name]:-} ]]; then
            pid=${stopping[$name]}
            while alive "$pid"; do
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
