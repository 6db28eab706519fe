#!/usr/bin/env bash
# Runs every cargo-fuzz target for SECONDS each (default 30), seeded from the tests' inputs, and fails on the first
# crash (libFuzzer leaves the crashing input in fuzz/artifacts/TARGET/). Longer runs: `./scripts/fuzz.sh 600`, or
# one target: `./scripts/fuzz.sh 600 usage_file`. Needs cargo-fuzz (installed here when missing) and a nightly
# toolchain, or stable with RUSTC_BOOTSTRAP=1 (used when no nightly is installed).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(all_users_csv usage_file encrypted_usage_file snapshot_validate proto_snapshot)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
fi

# Seeds: the CSV reader's test cases and the example reports; a usage file exported from an example report, and the
# same file encrypted to the encrypted target's fixed key (the first byte of its inputs picks the mode).
seeds_for() {
    case "$1" in
        all_users_csv) echo services/core/src/all_users_csv/cases examples ;;
        usage_file) echo fuzz/seeds/usage_file ;;
        encrypted_usage_file) echo fuzz/seeds/encrypted_usage_file ;;
        *) ;;
    esac
}

"${fuzz[@]}" build
for target in "${targets[@]}"; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    echo "== fuzzing $target for ${seconds}s"
    log="$(mktemp)"
    # shellcheck disable=SC2046 # the seed directories are words on purpose
    if ! "${fuzz[@]}" run "$target" "$corpus" $(seeds_for "$target") -- \
        -max_total_time="$seconds" -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
        tail -n 60 "$log" >&2
        echo "fuzz target $target failed; the crashing input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
    grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ +DONE)' "$log" || true
    rm -f "$log"
done
echo "fuzzing: ${#targets[@]} targets, ${seconds}s each, no crash"
