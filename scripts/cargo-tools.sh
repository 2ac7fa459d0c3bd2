#!/usr/bin/env bash
# The cargo-installed tool the test suites use, installed once into ~/.cargo/bin when
# missing: cargo-fuzz (scripts/fuzz-smoke.sh). It builds in a temporary directory that
# cargo deletes when done, never in the project's target dir, so it adds nothing to the
# disk a build of the project needs. .ci/run calls this before building anything.
set -euo pipefail

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "tools: installing cargo-fuzz"
  env -u CARGO_TARGET_DIR cargo install cargo-fuzz --locked --quiet
fi
