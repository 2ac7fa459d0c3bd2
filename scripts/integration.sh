#!/usr/bin/env bash
# The integration suite (tests/integration.rs) against real separate processes: installs
# what is missing (postfix's smtp-sink, Java and Maven via scripts/setup.sh; Apache Kafka
# from Maven Central via scripts/kafka.sh, cached), starts a one-node Kafka (KRaft) on
# free loopback ports, runs the suite, and stops Kafka on every exit path. Tests that
# need a cluster of three nodes, or a SASL_SSL listener, start their own with the same
# script. Extra arguments go to the test binary, e.g.
#   bash scripts/integration.sh kill_soak
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

bash scripts/setup.sh
bash scripts/kafka.sh fetch

dir=$(mktemp -d "${TMPDIR:-/tmp}/callnotify-kafka.XXXXXX")
# Its data and logs are removed after a passing run and kept after a failing one.
trap 'rc=$?; bash scripts/kafka.sh stop --dir "$dir" >/dev/null 2>&1 || true
  if [ "$rc" -eq 0 ]; then rm -rf "$dir"; else echo "integration: Kafka'"'"'s logs are kept in $dir"; fi' EXIT
bash scripts/kafka.sh start --dir "$dir" --nodes 1
echo "integration: Apache Kafka on $(cat "$dir/bootstrap") (logs in $dir)"

export CALLNOTIFY_IT_BROKERS=$(cat "$dir/bootstrap")
# Under the watchdog: a hung test is killed with its stacks printed (scripts/watchdog.sh).
# The suite runs its tests one at a time in one binary: 40 minutes for them all at most
# (about 10 on CI).
export WATCHDOG_SECS=${WATCHDOG_SECS:-2400}
# --nocapture: what the tests measure (takeover times, duplicates, pauses) shows in the log.
bash scripts/watchdog.sh cargo test --test integration -- --ignored --test-threads 1 --nocapture "$@"
# The load tester's tests that need a real broker (the topics of a run on --brokers).
if [ $# -eq 0 ]; then
  bash scripts/watchdog.sh cargo test -p callnotify-loadtest -- --ignored
fi
