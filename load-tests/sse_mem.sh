#!/usr/bin/env bash
# Memory per open SSE stream, the gateway alone (no nginx, no wait after): one gateway (1
# thread) in front of the Rust aoai-mock, a 50-stream warm-up, then STREAMS streams opened by
# `sse-load` within RAMP_MS; prints the idle RSS, the peak (VmHWM, reset first: needs root),
# (peak − idle) ÷ STREAMS, the TTFT line of sse-load, and the gateway's debug line with the
# size of one HTTP/1 connection's task. A quicker loop than sse.sh while changing the code.
# Also the gateway's CPU time (user + system) over the run. Only the first run of a gateway
# reads per stream right: the allocator keeps what the first run took.
# Usage: load-tests/sse_mem.sh [BIN_DIR]   env: STREAMS=1000 RAMP_MS=300 RUNS=1
#   WRAP="heaptrack -o /tmp/x" runs the gateway under a wrapper (a `system-alloc` build:
#   heaptrack sees only the C allocator, not mimalloc).
#   CG=DIR runs it under callgrind, instrumented only during the measured run, and leaves
#   the counts in DIR (per thread; `callgrind_annotate --inclusive=yes DIR/cg.out.*-01`):
#   instructions per stream opened and per chunk forwarded (the RSS figures then mean little).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
STREAMS=${STREAMS:-1000}
RAMP_MS=${RAMP_MS:-300}
RUNS=${RUNS:-1}
. load-tests/common.sh
load_note
MOCK=$(free_port)
"$BIN/aoai-mock" --listen "127.0.0.1:$MOCK" --chunk-delay-ms 50 --stream-chunks 20 >"$DIR/mock.out" 2>&1 &
pids+=($!)
wait_port "$MOCK" "aoai-mock"
GPORT=$(free_port); GADMIN=$(free_port)
HEALTH_PATH="/openai/models?api-version=2024-10-21" gateway_yaml gw "$GPORT" "$GADMIN" "http://127.0.0.1:$MOCK"
if [ -n "${CG:-}" ]; then
  mkdir -p "$CG"
  WRAP="valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes --callgrind-out-file=$CG/cg.out"
fi
# shellcheck disable=SC2086
RUST_LOG=gateway=debug ${WRAP:-} "$BIN/aoai-gateway" run -c "$DIR/gw.yaml" 2>"$DIR/gw.err" & pids+=($!); wrap_pid=$!
wait_port "$GPORT" "the gateway"
gw_pid=$(pgrep -f "aoai-gateway run -c $DIR/gw.yaml" | while read -r p; do
  if [ "$(readlink "/proc/$p/exe")" = "$(readlink -f "$BIN/aoai-gateway")" ]; then echo "$p"; fi; done | head -1)
[ -n "$gw_pid" ] || gw_pid=$wrap_pid
P=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
load() { "$BIN/sse-load" --addr "127.0.0.1:$GPORT" --path "$P" --streams "$1" --ramp-ms "$RAMP_MS" --header "api-key: $KEY"; }
cpu_ms() { awk -v t="$(getconf CLK_TCK)" '{printf "%d", ($14 + $15) * 1000 / t}' "/proc/$1/stat"; }
load 50 >/dev/null
sleep 2
for r in $(seq 1 "$RUNS"); do
  idle=$(rss_kib "$gw_pid")
  echo 5 >"/proc/$gw_pid/clear_refs"
  cpu0=$(cpu_ms "$gw_pid")
  [ -z "${CG:-}" ] || callgrind_control -i on "$gw_pid" >/dev/null
  line=$(load "$STREAMS")
  [ -z "${CG:-}" ] || { callgrind_control -i off "$gw_pid" >/dev/null; callgrind_control -d "$gw_pid" >/dev/null; }
  peak=$(hwm_kib "$gw_pid")
  cpu=$(( $(cpu_ms "$gw_pid") - cpu0 ))
  echo "run $r: idle $idle KiB, peak $peak KiB, per stream $(awk -v a="$peak" -v b="$idle" -v n="$STREAMS" 'BEGIN {printf "%.1f", (a-b)/n}') KiB; gateway CPU ${cpu} ms; $line"
  sleep 2
done
grep -m1 -o "an HTTP/1 connection's state: [0-9]* bytes" "$DIR/gw.err" || true
grep -o "a stream's task: [0-9]* bytes.*" "$DIR/gw.err" | head -3 || true
