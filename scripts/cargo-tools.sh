#!/usr/bin/env bash
# The cargo-installed tools the test suites use, installed once into ~/.cargo/bin when
# missing: tansu (the Kafka-compatible broker of scripts/integration.sh) and cargo-fuzz
# (scripts/fuzz-smoke.sh). Each install builds in a temporary directory that cargo
# deletes when done, never in the project's target dir, so it adds nothing to the disk a
# build of the project needs. .ci/run calls this before building anything.
set -euo pipefail

if ! command -v tansu >/dev/null; then
  echo "tools: installing tansu (once; later runs reuse ~/.cargo/bin/tansu)"
  env -u CARGO_TARGET_DIR cargo install tansu --locked --features dynostore --quiet
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "tools: installing cargo-fuzz"
  env -u CARGO_TARGET_DIR cargo install cargo-fuzz --locked --quiet
fi
