#!/usr/bin/env bash
# Runs every cargo-fuzz target of countersign-core for a bounded time each.
# Open-ended fuzzing is not run by CI; run it by hand or on a schedule.
#
#   filter/core/fuzz/run.sh                  # every target, 60 s each
#   filter/core/fuzz/run.sh --replay 20000   # what `./dev test` runs (below)
#   filter/core/fuzz/run.sh 300 token_verify # one target, 300 s
#   filter/core/fuzz/run.sh --save 60        # and merge new coverage into seeds/
#
# Needs a nightly toolchain (`rustup toolchain install nightly`) and
# cargo-fuzz (`cargo install cargo-fuzz`); says so and exits 3 without them.
# Inputs: seeds/<target>/ (committed, small) plus corpus/<target>/ (libFuzzer's
# working corpus, git-ignored). With --save, inputs of corpus/<target> that
# add coverage are merged into seeds/<target> (libFuzzer -set_cover_merge=1), so the
# committed corpus stays small and keeps what was found.
# A crash leaves its input in artifacts/<target>/ and makes the exit status 1;
# turn every finding into a regression test before fixing it.
#
# --replay RUNS needs only stable Rust and a C++ compiler: it builds the same
# targets with plain cargo (libFuzzer linked, no coverage instrumentation),
# runs every committed seed through each, then RUNS mutations of them. The
# mutations are blind (nothing guides them without coverage), so this is a
# bounded regression run of the properties each target checks, not fuzzing.
# Seeds are only read: new inputs go to a temporary directory.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"

if [ "${1:-}" = "--replay" ]; then
    runs="${2:-20000}"
    case "$runs" in ''|*[!0-9]*) echo "usage: $0 --replay [RUNS]" >&2; exit 2 ;; esac
    cargo build -q --release --locked --manifest-path "$here/Cargo.toml"
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
    failed=()
    for seeds in "$here"/seeds/*/; do
        t="$(basename "$seeds")"
        mkdir -p "$scratch/$t" "$scratch/artifacts-$t"
        log="$scratch/$t.log"
        if "$here/target/release/$t" -runs="$runs" -seed=1 -max_len=8192 \
                -artifact_prefix="$scratch/artifacts-$t/" "$scratch/$t" "$seeds" >"$log" 2>&1; then
            echo "fuzz: $t: $(find "$seeds" -type f | wc -l) seeds and $runs mutations, no failure"
        else
            failed+=("$t")
            grep -E "^(==[0-9]+==|thread '|SUMMARY|panicked|Test unit written)" "$log" | head -20 || true
            mkdir -p "$here/artifacts/$t"
            cp "$scratch/artifacts-$t/"* "$here/artifacts/$t/" 2>/dev/null || true
            echo "fuzz: $t FAILED; the input is in filter/core/fuzz/artifacts/$t/"
        fi
    done
    [ "${#failed[@]}" -eq 0 ] || exit 1
    exit 0
fi

save=0
if [ "${1:-}" = "--save" ]; then save=1; shift; fi
seconds="${1:-${FUZZ_SECONDS:-60}}"
shift || true
case "$seconds" in ''|*[!0-9]*) echo "usage: $0 [--save] [SECONDS] [TARGET...]" >&2; exit 2 ;; esac

cd "$here/.."   # filter/core: cargo fuzz looks for ./fuzz

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: no nightly toolchain; install it with: rustup toolchain install nightly" >&2
    echo "fuzz: ran nothing" >&2
    exit 3
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is missing; install it with: cargo install cargo-fuzz" >&2
    echo "fuzz: ran nothing" >&2
    exit 3
fi

if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "fuzz: $(cargo +nightly --version), $(cargo +nightly fuzz --version)"
echo "fuzz: targets: ${targets[*]}; ${seconds}s each"
failed=()
summary=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/seeds/$t" "fuzz/artifacts/$t"
    log="fuzz/artifacts/$t/last-run.log"
    echo "fuzz: == $t: cargo fuzz run -O $t fuzz/corpus/$t fuzz/seeds/$t -- -max_total_time=$seconds"
    status=ok
    if ! cargo +nightly fuzz run -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
            -max_total_time="$seconds" -print_final_stats=1 >"$log" 2>&1; then
        status=FAILED
        failed+=("$t")
        grep -E "^(==[0-9]+==|thread '|SUMMARY|Test unit written|artifact_prefix)" "$log" | head -20 || true
        echo "fuzz: $t failed; full log: filter/core/$log"
    fi
    execs="$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -1 || true)"
    if [ "$save" = 1 ] && [ "$status" = ok ]; then
        cargo +nightly fuzz run -O "$t" "fuzz/seeds/$t" "fuzz/corpus/$t" -- -set_cover_merge=1 -use_counters=0 >>"$log" 2>&1 \
            || echo "fuzz: merging the corpus of $t into seeds/ failed (see $log)"
    fi
    summary+=("$(printf '%-16s %-7s %10s execs  corpus %5s files  seeds %4s files' "$t" "$status" "${execs:-?}" \
        "$(find "fuzz/corpus/$t" -type f | wc -l)" "$(find "fuzz/seeds/$t" -type f | wc -l)")")
done

echo "fuzz: summary (${seconds}s per target)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz: FAILED: ${failed[*]} (inputs in filter/core/fuzz/artifacts/<target>/)"
    exit 1
fi
echo "fuzz: no crash"
