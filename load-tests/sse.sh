#!/usr/bin/env bash
# Concurrent SSE streams: the gateway (1 thread) vs nginx (1 worker) vs straight to the mock.
# Backend: the Rust aoai-mock (one thread), streams of 20 content chunks, 50 ms apart
# (`--stream-chunks 20 --chunk-delay-ms 50`: ~1.05 s a stream). Client: `sse-load` (aoai-mock's
# second binary, one thread): N streamed chat completions started within RAMP_MS, each checked
# for status 200, `data: [DONE]` and the end of the body; time to the first `data:` byte.
# Memory: the proxy's peak RSS (VmHWM, reset before each run through /proc/PID/clear_refs), the
# increase over its idle RSS (after the warm-up) divided by N, and its RSS 30 s after the run.
# nginx's figures are its worker's. Targets alternate: gateway, nginx, direct, for each N.
# Usage: load-tests/sse.sh [BIN_DIR]   (default target/release: needs aoai-gateway, aoai-mock
#   and sse-load, `cargo build --release --workspace`)   env: STREAMS="1000 2000" RAMP_MS=300
#   AFTER=30 (seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
STREAMS=${STREAMS:-"1000 2000"}
RAMP_MS=${RAMP_MS:-300}
AFTER=${AFTER:-30}
for b in aoai-gateway aoai-mock sse-load; do
  [ -x "$BIN/$b" ] || { echo "no $BIN/$b (cargo build --release --workspace)" >&2; exit 1; }
done
. load-tests/common.sh
need nginx curl python3
[ "$(id -u)" = 0 ] || { echo "needs root (to reset the peak RSS through /proc/PID/clear_refs)" >&2; exit 1; }
load_note

MOCK=$(free_port)
"$BIN/aoai-mock" --listen "127.0.0.1:$MOCK" --chunk-delay-ms 50 --stream-chunks 20 >"$DIR/mock.out" 2>&1 &
pids+=($!); mock_pid=$!
wait_port "$MOCK" "aoai-mock"
NPORT=$(free_port); start_nginx_proxy psse "$NPORT" "127.0.0.1:$MOCK"
GPORT=$(free_port); GADMIN=$(free_port)
HEALTH_PATH="/openai/models?api-version=2024-10-21" gateway_yaml gw "$GPORT" "$GADMIN" "http://127.0.0.1:$MOCK"
start_gateway gw "$GPORT"
PATH_SSE=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21

load() { # port streams -> sse-load's line
  "$BIN/sse-load" --addr "127.0.0.1:$1" --path "$PATH_SSE" --streams "$2" --ramp-ms "$RAMP_MS" \
    --header "api-key: $KEY"
}
# Warm-up: each target serves a few streams first (pools, buffers, the tokenizer's tables).
for port in "$GPORT" "$NPORT" "$MOCK"; do
  out=$(load "$port" 50)
  case "$out" in *"completed=50 "*) ;; *) echo "warm-up on port $port: $out" >&2; cat "$DIR/gw.err" >&2; exit 1 ;; esac
done
sleep 2
# Idle RSS of each target after its warm-up: the base of "per stream" in every run (what an
# earlier run left allocated counts against the later one, as it would in service).
declare -A IDLE=([gateway]=$(rss_kib "$gw_pid") [nginx]=$(rss_kib "$proxy_worker") [direct]=$(rss_kib "$mock_pid"))
field() { echo "$1" | tr ' ' '\n' | awk -F= -v k="$2" '$1==k {print $2}'; }
measure() { # name pid port streams -> "name|line|before_kib|peak_kib" and the run's end time in $DIR/end-name
  local before peak line
  before=$(rss_kib "$2")
  echo 5 >"/proc/$2/clear_refs"
  line=$(load "$3" "$4")
  peak=$(hwm_kib "$2")
  date +%s >"$DIR/end-$1"
  echo "$1|$line|$before|$peak" >>"$DIR/rows-$4"
}
after() { # name pid -> waits until AFTER seconds past that run's end, prints RSS KiB
  local end; end=$(cat "$DIR/end-$1")
  while [ "$(date +%s)" -lt $((end + AFTER)) ]; do sleep 0.5; done
  rss_kib "$2"
}

for n in $STREAMS; do
  : >"$DIR/rows-$n"
  measure gateway "$gw_pid" "$GPORT" "$n"
  measure nginx "$proxy_worker" "$NPORT" "$n"
  measure direct "$mock_pid" "$MOCK" "$n"
  g_after=$(after gateway "$gw_pid"); n_after=$(after nginx "$proxy_worker")
  echo
  echo "== $n concurrent streams (20 chunks x 50 ms), connects spread over ${RAMP_MS} ms"
  printf '%-24s %-10s %-16s %-20s %-16s %-14s %s\n' target completed "TTFT p50/p99 ms" "RSS before/peak MiB" "KiB/stream (idle)" "RSS +${AFTER}s MiB" "wall s"
  while IFS='|' read -r name line before peak; do
    c=$(field "$line" completed); f=$(field "$line" failed)
    t="$(field "$line" ttft_p50_ms)/$(field "$line" ttft_p99_ms)"
    per=$(awk -v a="$peak" -v b="${IDLE[$name]}" -v n="$n" 'BEGIN {printf "%.1f", (a-b)/n}')
    case $name in gateway) a=$g_after ;; nginx) a=$n_after ;; *) a="" ;; esac
    label=$name; [ "$name" = direct ] && label="direct (mock's RSS)"; [ "$name" = nginx ] && label="nginx (worker)"
    printf '%-24s %-10s %-16s %-20s %-16s %-14s %s\n' "$label" "$c/$n$([ "$f" = 0 ] || echo " ($f failed)")" "$t" \
      "$((before / 1024)) / $((peak / 1024))" "$per" "${a:+$((a / 1024))}" "$(field "$line" wall_s)"
  done <"$DIR/rows-$n"
  g=$(grep '^gateway|' "$DIR/rows-$n"); ng=$(grep '^nginx|' "$DIR/rows-$n")
  gper=$(echo "$g" | awk -F'|' -v n="$n" -v i="${IDLE[gateway]}" '{printf "%.1f", ($4-i)/n}')
  nper=$(echo "$ng" | awk -F'|' -v n="$n" -v i="${IDLE[nginx]}" '{printf "%.1f", ($4-i)/n}')
  echo "gateway / nginx (lower is better): RSS per stream $(ratio "$gper" "$nper")x; TTFT p50 $(ratio "$(field "$(echo "$g" | cut -d'|' -f2)" ttft_p50_ms)" "$(field "$(echo "$ng" | cut -d'|' -f2)" ttft_p50_ms)")x"
  echo "RSS ${AFTER}s after: gateway $((g_after / 1024)) MiB, nginx $((n_after / 1024)) MiB (idle after warm-up: $((IDLE[gateway] / 1024)) and $((IDLE[nginx] / 1024)) MiB)"
done
echo
echo "gateway WARN/ERROR log lines: $(grep -cE 'WARN|ERROR' "$DIR/gw.err" || true); audit lines by status:"
grep -o '"status":[0-9]*' "$DIR/gw-audit.log" | sort | uniq -c | sort -rn | head -5
