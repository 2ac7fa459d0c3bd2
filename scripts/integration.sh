#!/usr/bin/env bash
# The integration suite (tests/integration.rs) against real separate processes: installs
# what is missing (tansu from crates.io via scripts/cargo-tools.sh; postfix's smtp-sink via
# scripts/setup.sh), starts a tansu broker on a free loopback port, runs the suite, and
# stops the broker on every exit path. Extra arguments go to the test binary, e.g.
#   bash scripts/integration.sh kill_soak --nocapture
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/setup.sh
bash scripts/cargo-tools.sh

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp "${TMPDIR:-/tmp}/tansu.XXXXXX.log")
tansu broker --storage-engine memory://tansu/ \
  --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" >"$log" 2>&1 &
broker=$!
trap 'kill "$broker" 2>/dev/null || true; wait "$broker" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  kill -0 "$broker" 2>/dev/null || { cat "$log"; echo "integration: tansu did not start" >&2; exit 1; }
  sleep 0.1
done
echo "integration: tansu on 127.0.0.1:$port (log $log)"

export CALLNOTIFY_IT_BROKERS="127.0.0.1:$port"
# Under the watchdog: a hung test is killed with its stacks printed (scripts/watchdog.sh).
# The suite runs its tests one at a time, about 5 minutes in all here: 40 minutes each.
export WATCHDOG_SECS=${WATCHDOG_SECS:-2400}
bash scripts/watchdog.sh cargo test --test integration -- --ignored --test-threads 1 "$@"
# The load tester's tests that need a broker creating topics on request.
if [ $# -eq 0 ]; then
  bash scripts/watchdog.sh cargo test -p callnotify-loadtest -- --ignored
fi
