#!/usr/bin/env bash
# Runs a command (the test suite) and watches its test binaries: one that has run for
# WATCHDOG_SECS (default 900) has its threads' stacks, and its children's, printed by
# gdb and is killed. A hung test then fails the run and shows where it hung, instead of
# running into CI's time limit with nothing to show.
#   bash scripts/watchdog.sh cargo test --workspace
set -uo pipefail
limit=${WATCHDOG_SECS:-900}
target=$(realpath -m "${CARGO_TARGET_DIR:-target}")

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
      pkill -KILL -P "$pid"
      kill -KILL "$pid"
    done
  done
}
watch &
watcher=$!
wait "$run"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
