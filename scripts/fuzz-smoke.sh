#!/usr/bin/env bash
# Fuzz smoke test: builds the cargo-fuzz targets in fuzz/ and runs each one briefly
# (FUZZ_SECONDS, default 20) from a temporary copy of its committed seed corpus, so new
# inputs never land in fuzz/corpus and git stays clean. Fails if a target crashes, and
# prints the input (base64 and hex) so a CI log is enough to reproduce it; the artifact
# is also kept in fuzz/artifacts/<target>/ for local runs (`<binary> <artifact>`).
#
# Toolchain: stable Rust; cargo-fuzz passes nightly-only `-Z` flags, which stable rustc
# accepts with RUSTC_BOOTSTRAP=1.
# Sanitizer: none. We fuzz for panics and logic errors in safe Rust, which needs only
# libFuzzer's coverage instrumentation. AddressSanitizer would find nothing more there:
# the targets call no unsafe code of ours, and the C code in the build (librdkafka, via
# the engine's rdkafka dependency) is neither reached by them nor instrumented by
# cargo-fuzz. Leaving it off also keeps the one-off build of the engine's dependencies
# (about 8 minutes on 2 cores) from getting slower.
# Target dir: fuzz/target (cargo-fuzz's default, given explicitly so a CARGO_TARGET_DIR
# in the environment cannot mix the instrumented build into the shared target dir).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fuzz_dir=$root/fuzz
seconds=${FUZZ_SECONDS:-20}
export RUSTC_BOOTSTRAP=1

bash "$root/scripts/cargo-tools.sh"

work=$(mktemp -d "${TMPDIR:-/tmp}/fuzz-smoke.XXXXXX")
trap 'rm -rf "$work"' EXIT

cd "$root"
mapfile -t targets < <(cargo fuzz list --fuzz-dir "$fuzz_dir")
if ((${#targets[@]} == 0)); then
    echo "fuzz: no targets in $fuzz_dir" >&2
    exit 1
fi
if ! cargo fuzz build --fuzz-dir "$fuzz_dir" --sanitizer none --target-dir "$fuzz_dir/target" >"$work/build.log" 2>&1; then
    cat "$work/build.log"
    echo "fuzz: build failed" >&2
    exit 1
fi
bin_dir=$fuzz_dir/target/$(rustc -vV | sed -n 's/^host: //p')/release

failed=()
for target in "${targets[@]}"; do
    corpus=$work/corpus/$target
    mkdir -p "$corpus" "$fuzz_dir/artifacts/$target"
    if [[ -d $fuzz_dir/corpus/$target ]]; then
        cp -R "$fuzz_dir/corpus/$target/." "$corpus/"
    fi
    log=$work/$target.log
    # libFuzzer writes new inputs only to the first corpus dir, the temporary copy.
    if "$bin_dir/$target" "$corpus" -max_total_time="$seconds" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$fuzz_dir/artifacts/$target/" >"$log" 2>&1; then
        runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
        added=$(sed -n 's/^stat::new_units_added: *//p' "$log")
        printf 'fuzz: %-18s ok  %9s runs in %ss, %s new inputs\n' "$target" "${runs:-?}" "$seconds" "${added:-?}"
        continue
    fi
    failed+=("$target")
    echo "fuzz: $target FAILED"
    # The panic message (or libFuzzer's reason: timeout, out of memory) and the input.
    reason='panicked at|ERROR: libFuzzer'
    if grep -qE "$reason" "$log"; then
        grep -E -A3 "$reason" "$log" | grep -v '^--$' | head -n 20
    else
        tail -n 30 "$log"
    fi
    artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    if [[ -n $artifact && -f $artifact ]]; then
        echo "fuzz: input saved as $artifact ($(wc -c <"$artifact") bytes); base64:"
        base64 -w 0 "$artifact"
        echo
        echo "fuzz: hex:"
        od -A x -t x1z -v "$artifact" | head -n 64
        echo "fuzz: reproduce with: $bin_dir/$target $artifact"
    fi
done

if ((${#failed[@]})); then
    echo "fuzz: ${#failed[@]} of ${#targets[@]} targets failed: ${failed[*]}" >&2
    exit 1
fi
