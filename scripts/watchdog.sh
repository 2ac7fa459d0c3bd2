#!/usr/bin/env bash
# Runs a command (the test suite) and watches its test binaries: one that has run for
# WATCHDOG_SECS (default 900) has its threads' stacks, and its children's, printed by
# gdb and is killed with every process under it (the engines and Kafka brokers a test
# started among them). A hung test then fails the run and shows where it hung, instead
# of running into CI's time limit with nothing to show. Ctrl-C (or SIGTERM) stops the
# command and everything under it: a background command of a script ignores SIGINT, so
# the tests ran on without it.
#   bash scripts/watchdog.sh cargo test --workspace
set -uo pipefail
limit=${WATCHDOG_SECS:-900}
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")

# PID and every process under it, the deepest first.
tree() {
  local child
  for child in $(pgrep -P "$1"); do tree "$child"; done
  echo "$1"
}

"$@" &
run=$!

watch() {
  while kill -0 "$run" 2>/dev/null; do
    sleep 10
    for pid in $(pgrep -f "^$target/[^ ]*/deps/"); do
      age=$(ps -o etimes= -p "$pid" 2>/dev/null | tr -d ' ')
      [ -n "$age" ] && [ "$age" -ge "$limit" ] || continue
      echo "watchdog: $(ps -o args= -p "$pid") has run ${age}s; its threads, then its children's:" >&2
      for p in "$pid" $(pgrep -P "$pid"); do
        echo "--- process $p: $(ps -o args= -p "$p")" >&2
        timeout 60 gdb -batch -p "$p" -ex "thread apply all bt" 2>&1 | grep -E '^(Thread|#)' >&2
      done
      # All at once: a child whose parent died first is no longer found under it.
      kill -KILL $(tree "$pid") 2>/dev/null
    done
  done
}
watch &
watcher=$!
# TERM first (the tests' own clean-up runs), KILL for what is left after 10 s; the exit
# status says which signal stopped it.
stop() {
  { kill -KILL $(tree "$watcher"); wait "$watcher"; } 2>/dev/null
  local left
  left=$(tree "$run")
  kill -TERM $left 2>/dev/null
  for _ in $(seq 100); do
    kill -0 $left 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL $(tree "$run") $left 2>/dev/null
  wait "$run" 2>/dev/null
  exit "$1"
}
trap 'stop 130' INT
trap 'stop 143' TERM
wait "$run"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
