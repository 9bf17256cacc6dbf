#!/usr/bin/env bash
# Runs every cargo-fuzz target (fuzz/fuzz_targets) for FUZZ_SECONDS each (default 20) on its
# committed seeds (fuzz/seeds/<target>) and regression inputs (fuzz/regressions/<target>, kept
# from crashes once fixed), growing fuzz/corpus/<target>. Prints one line per target with the
# executions libFuzzer made; stops at the first crash, naming the saved input.
# Needs the nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz --locked`).
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-20}
# FUZZ_BUILD=--dev builds the targets unoptimised: much quicker to build (CI), fewer executions
# per second. The default is optimised (-O).
mode=${FUZZ_BUILD:--O}
root=$(pwd)/fuzz
cargo +nightly fuzz build "$mode"
for t in $(cargo +nightly fuzz list); do
    mkdir -p "$root/corpus/$t" "$root/regressions/$t" "$root/seeds/$t"
    log=$(mktemp)
    if ! cargo +nightly fuzz run "$mode" "$t" "$root/corpus/$t" "$root/seeds/$t" "$root/regressions/$t" \
        -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=10 >"$log" 2>&1; then
        tail -40 "$log"
        echo "fuzz $t: CRASH — the input is in fuzz/artifacts/$t; fix it, then keep it in fuzz/regressions/$t"
        rm -f "$log"
        exit 1
    fi
    done_line=$(grep -Eo 'Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
    execs=$(echo "$done_line" | awk '{print $2}')
    took=$(echo "$done_line" | awk '{print $5}')
    echo "fuzz $t: ${execs:-?} execs in ${took:-?} s, 0 crashes, corpus $(ls "$root/corpus/$t" | wc -l) inputs"
    rm -f "$log"
done
