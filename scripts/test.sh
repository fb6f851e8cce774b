#!/usr/bin/env bash
# Install everything and run the whole test suite against the real PostgreSQL, Redis and
# RabbitMQ.
# Starts the local servers when they are installed but stopped. Extra arguments go to both
# pytest runs (the main suite, then the crash and chaos tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet --disable-pip-version-check uv
fi

if command -v pg_ctlcluster >/dev/null 2>&1 && ! pg_isready -q -h 127.0.0.1 -p 5432; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if command -v redis-server >/dev/null 2>&1 && ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
    echo "starting Redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
fi
if command -v rabbitmq-server >/dev/null 2>&1 && ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
    for _ in $(seq 1 60); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
for _ in $(seq 1 30); do
    pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null && break
    sleep 1
done

uv sync --frozen --quiet --compile-bytecode
# The main suite, then the crash tests and the chaos suite (CI-sized; `-m long` runs the
# long variants). Naming tests or passing a value (-k EXPR) runs only the first.
uv run pytest "$@"
for arg in "$@"; do
    case "$arg" in -*) ;; *) exit 0 ;; esac
done
exec uv run pytest -m "(chaos or slow) and not long" "$@"
