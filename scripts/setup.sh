#!/usr/bin/env bash
# What a fresh Debian machine needs to build and test callnotify; installs only what is
# missing, so running it again changes nothing. Needs root (apt-get).
set -euo pipefail

need=()

# Rust itself is not a Debian package new enough: the locked dependencies need rustc
# 1.89 or later (Cargo.toml's rust-version), from rustup (https://rustup.rs).
rust_ok() {
  local version
  version=$(rustc --version 2>/dev/null | awk '{print $2}')
  [ -n "$version" ] && [ "$(printf '%s\n1.89.0\n' "$version" | sort -V | head -n1)" = 1.89.0 ]
}
rust_ok || echo "setup: Rust 1.89 or later is needed to build (found: $(rustc --version 2>/dev/null || echo none)); install it with rustup (https://rustup.rs)" >&2

# librdkafka (bundled by rdkafka-sys) builds with the C toolchain, make, perl and zlib,
# and links OpenSSL for TLS and SASL (SCRAM) to secured Kafka clusters.
build_tools=0
for tool in cc make perl pkg-config; do command -v "$tool" >/dev/null || build_tools=1; done
if ! { [ -e /usr/include/zlib.h ] || [ -e /usr/include/x86_64-linux-gnu/zlib.h ]; }; then build_tools=1; fi
if [ "$build_tools" = 1 ]; then need+=(build-essential perl pkg-config zlib1g-dev); fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

installed libssl-dev || need+=(libssl-dev)
# The integration suite's SASL_SSL test makes its own CA with the openssl command.
command -v openssl >/dev/null || need+=(openssl)
# Apache Kafka for the integration suite (scripts/kafka.sh): a Java 17+ runtime (the
# distribution's default: 17 on Debian 12, 21 on Debian 13, which has no 17), and Maven
# to fetch the broker from Maven Central.
java_major=0
if command -v java >/dev/null; then
  java_major=$(java -version 2>&1 | awk -F'"' '/version/ {split($2, v, "."); print v[1]; exit}' || true)
fi
[ "${java_major:-0}" -ge 17 ] 2>/dev/null || need+=(default-jre-headless)
command -v mvn >/dev/null || need+=(maven)

# tests/browser.rs: headless Chromium through chromedriver, and a Japanese font so its
# screenshots show the site's text rather than empty boxes.
for package in chromium chromium-driver fonts-ipafont-gothic; do
  installed "$package" || need+=("$package")
done

# tests/browser.rs also runs axe-core (npm, pinned in tests/browser/axe) in every page.
command -v npm >/dev/null || need+=(nodejs npm)

# scripts/kafka.sh, scripts/module-cycles.py and scripts/prometheus-check.py.
command -v python3 >/dev/null || need+=(python3)

# A test process that hangs has its threads' stacks printed before it is killed
# (scripts/watchdog.sh, tests/cli.rs).
installed gdb || need+=(gdb)

# The load tester's `smtp` comparison uses postfix's smtp-sink and smtp-source; the mail
# service itself is never run.
postfix=0
installed postfix || { postfix=1; need+=(postfix); }

# deploy/'s checks (scripts/deploy-check.sh): promtool and a Prometheus run by the check
# itself (the package's service is never started), and systemd-analyze.
daemons=$postfix
command -v promtool >/dev/null || { daemons=1; need+=(prometheus); }
command -v systemd-analyze >/dev/null || need+=(systemd)

# The accessibility checker, from npm's registry at the version the lock file pins.
axe() {
  local dir
  dir="$(dirname "$0")/../tests/browser/axe"
  [ -e "$dir/node_modules/axe-core/axe.min.js" ] || npm ci --prefix "$dir" --no-audit --no-fund --silent
}

if [ ${#need[@]} -eq 0 ]; then
  axe
  exit 0
fi
echo "setup: installing ${need[*]}"
apt-get update -qq
if [ "$postfix" = 1 ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
fi
if [ "$daemons" = 1 ]; then
  # Keep the packages' scripts from starting (or failing to start) their daemons.
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
fi
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
apt-get clean   # the downloaded packages: disk the builds need
if [ "$daemons" = 1 ] && command -v systemctl >/dev/null; then
  # Nor started at the next boot: Prometheus (:9090) and its node exporter (:9100) would
  # listen on every interface of a developer's machine.
  systemctl disable prometheus prometheus-node-exporter postfix >/dev/null 2>&1 || true
fi
axe
