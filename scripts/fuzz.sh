#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS each (default 600), after building them all
# once; exits non-zero if any target found something (a crash, a failed invariant, a hang
# past FUZZ_TIMEOUT seconds or memory past FUZZ_RSS_MB), whose input libFuzzer leaves in
# fuzz/artifacts/<target>/. New inputs go to fuzz/corpus/<target> (not committed); the
# committed seeds (fuzz/seeds/<target>) and saved findings (fuzz/regressions/<target>) are
# read and replayed first, never written. Logs: fuzz/artifacts/logs/.
#
#   scripts/fuzz.sh 30                      # every target, 30 s each
#   FUZZ_TARGETS="chunked_body" scripts/fuzz.sh 600
#   FUZZ_SANITIZER=address scripts/fuzz.sh 600   # ASan instead of none (see fuzz/README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-600}
sanitizer=${FUZZ_SANITIZER:-none}
export OPENSSL_NO_VENDOR=1
# Debug assertions and overflow checks on (-a): an overflow is a finding.
flags=(--sanitizer "$sanitizer" -a)
targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}

start=$(date +%s)
nice -n "${FUZZ_NICE:-10}" cargo +nightly fuzz build "${flags[@]}"
echo "built in $(($(date +%s) - start)) s"

mkdir -p fuzz/artifacts/logs
failed=()
for t in $targets; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/artifacts/logs/$t.log"
  echo "== $t: ${secs} s"
  rc=0
  # Inputs: the new corpus (written), the seeds and the saved findings (replayed first).
  inputs=("fuzz/corpus/$t" "fuzz/seeds/$t")
  [ -d "fuzz/regressions/$t" ] && inputs+=("fuzz/regressions/$t")
  nice -n "${FUZZ_NICE:-10}" cargo +nightly fuzz run "${flags[@]}" "$t" "${inputs[@]}" -- \
    -max_total_time="$secs" -timeout="${FUZZ_TIMEOUT:-10}" -rss_limit_mb="${FUZZ_RSS_MB:-4096}" \
    -print_final_stats=1 >"$log" 2>&1 || rc=$?
  # The last status line (coverage, features, corpus) and the totals.
  grep -E '^#[0-9]+' "$log" | tail -n 1 || true
  grep -E 'stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)' "$log" | tr '\n' ' ' || true
  echo
  if [ "$rc" -ne 0 ]; then
    echo "!! $t: finding (exit $rc); see $log and fuzz/artifacts/$t/"
    grep -E 'panicked at|ERROR: libFuzzer|SUMMARY|Test unit written' "$log" | head -n 5 || true
    failed+=("$t")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "findings in: ${failed[*]}"
  exit 1
fi
echo "no findings ($(($(date +%s) - start)) s in all)"
