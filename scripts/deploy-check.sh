#!/usr/bin/env bash
# The operator's files in deploy/, checked with the operator's own tools: promtool on the
# alert rules and their unit tests, systemd-analyze on the unit, `callnotify config check`
# on the example configuration, and scripts/prometheus-check.py (the dashboard's JSON,
# then a real Prometheus scraping an engine under traffic, asked every expression of the
# dashboard and the rules). Needs the debug binaries built; CI runs it from .ci/run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=${CARGO_TARGET_DIR:-$root/target}/debug
cd "$root"

promtool check rules deploy/prometheus/alerts.yml
(cd deploy/prometheus && promtool test rules alerts.test.yml)

# The unit as installed names /usr/local/bin/callnotify, which systemd-analyze wants to
# exist; the check runs on a copy that names the binary just built. Any complaint fails.
unit=$(mktemp -d)/callnotify.service
sed "s#/usr/local/bin/callnotify#$bin/callnotify#" deploy/systemd/callnotify.service >"$unit"
complaints=$(systemd-analyze verify "$unit" 2>&1 || true)
rm -r "$(dirname "$unit")"
if [ -n "$complaints" ]; then
  echo "deploy/systemd/callnotify.service: $complaints" >&2
  exit 1
fi
echo "deploy/systemd/callnotify.service: systemd-analyze verify finds nothing"
# `config check` compares a configuration's stop with the unit's TimeoutStopSec, as
# src/main.rs knows it: the two must agree.
in_unit=$(sed -n 's/^TimeoutStopSec=//p' deploy/systemd/callnotify.service)
in_code=$(sed -n 's/^const UNIT_TIMEOUT_STOP_SECS: u64 = \([0-9]*\);$/\1/p' src/main.rs)
if [ "$in_unit" != "$in_code" ]; then
  echo "deploy/systemd/callnotify.service: TimeoutStopSec=$in_unit, but src/main.rs's UNIT_TIMEOUT_STOP_SECS is '$in_code'" >&2
  exit 1
fi

# With the secret that /etc/callnotify/secrets.env gives it (the SMTP username wants it).
CALLNOTIFY__SMTP__PASSWORD=from-secrets-env "$bin/callnotify" --config deploy/callnotify.toml config check >/dev/null

python3 scripts/prometheus-check.py --loadtest "$bin/callnotify-loadtest"
