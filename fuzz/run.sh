#!/usr/bin/env bash
# Runs each fuzz target for SECONDS (60 for a pull request, 600 before a
# release), one after another, on the kept corpus in corpus/<target>/.
#
#   fuzz/run.sh [SECONDS] [TARGET...]     default: 60 s, every target
#   MERGE=1 fuzz/run.sh 600               also fold new coverage into corpus/
#
# Needs nightly and cargo-fuzz (`cargo install cargo-fuzz --locked`). New
# inputs go to work/<target>/ (not committed); corpus/<target>/ is only read
# unless MERGE=1, which adds the small inputs that reach new code (libFuzzer
# -merge=1), keeping the committed corpus small. Crashes land in
# artifacts/<target>/; the script goes on with the next target and exits 1.
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-60}"
shift || true
if [ "$#" -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

# -s none: tether forbids unsafe code, so ASan buys little and halves the
# speed; -a keeps debug assertions and overflow checks on. Each input gets
# 10 s and 2 GiB: a hang or a huge allocation is a finding, like a panic.
flags=(-s none -a)
libfuzzer=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)

cargo +nightly fuzz build "${flags[@]}"
failed=()
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "corpus/$t"
  echo "=== $t: ${secs}s"
  if ! cargo +nightly fuzz run "${flags[@]}" "$t" "work/$t" "corpus/$t" -- "${libfuzzer[@]}"; then
    failed+=("$t")
    continue
  fi
  if [ "${MERGE:-0}" = 1 ]; then
    # Only inputs of at most 512 bytes are candidates: they carry nearly all
    # the coverage and keep the committed corpus a few hundred KB.
    small="$(mktemp -d)"
    find "work/$t" -type f -size -513c -exec cp {} "$small/" \;
    cargo +nightly fuzz run "${flags[@]}" "$t" "corpus/$t" "$small" -- -merge=1 -timeout=10
    rm -rf "$small"
  fi
done

if [ "${#failed[@]}" -gt 0 ]; then
  echo "findings in: ${failed[*]} (see fuzz/artifacts/; reproduce with" \
    "cargo +nightly fuzz run -s none -a TARGET ARTIFACT)" >&2
  exit 1
fi
