#!/usr/bin/env bash
# TLS: nginx (1 worker) vs the gateway (1 thread), same nginx mock behind both, API-key auth,
# one RSA-2048 self-signed certificate, wrk -t1 over https, targets alternating each round:
#   1. keep-alive (c=10);  2. a handshake per request (`Connection: close`, c=10);
#   3. the mixed storm: keep-alive clients (c=10) measured while a handshake storm runs
#      (c=64, `Connection: close`) against the same target; the keep-alive clients' RPS and
#      p50 beside nginx's, their ratio (issue 18's goal: >= 0.8x), and the storm's own rate
#      (handshakes/s). The storm runs against one gateway per `server.tls_handshake_pacing`
#      value in PACING and `server.tls_handshakes_per_thread` value in HS_VALUES (all started
#      at once, so the rounds alternate).
# Usage: load-tests/tls.sh [BIN_DIR]   (default target/release)
#   env: ROUNDS=3 DURATION=5 (seconds) PACING="per_pass none" HS_VALUES="4 16"
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
PACING=${PACING:-"per_pass none"}
HS_VALUES=${HS_VALUES:-"4 16"}
VARIANTS=""; for p in $PACING; do for v in $HS_VALUES; do VARIANTS="$VARIANTS ${p}_$v"; done; done
[ -x "$BIN/aoai-gateway" ] || { echo "no $BIN/aoai-gateway (cargo build --release)" >&2; exit 1; }
. load-tests/common.sh
need nginx wrk openssl curl python3
load_note
make_cert

MOCK=$(free_port); start_nginx_mock "$MOCK"
NPORT=$(free_port); SSL=1 start_nginx_proxy ptls "$NPORT" "127.0.0.1:$MOCK"
declare -A GPORT GADMIN GPID
for v in $VARIANTS; do
  GPORT[$v]=$(free_port); GADMIN[$v]=$(free_port)
  TLS=1 SERVER_EXTRA=$(printf '  tls_handshakes_per_thread: %s\n  tls_handshake_pacing: %s' "${v##*_}" "${v%_*}") \
    gateway_yaml "gw$v" "${GPORT[$v]}" "${GADMIN[$v]}" "http://127.0.0.1:$MOCK"
  start_gateway "gw$v" "${GPORT[$v]}"; GPID[$v]=$gw_pid
done
DEFAULT_HS=per_pass_16; [ -n "${GPORT[$DEFAULT_HS]:-}" ] || DEFAULT_HS=$(echo "$VARIANTS" | awk '{print $1}')
PATH_CHAT=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
for port in "$NPORT" "${GPORT[@]}"; do
  code=$(curl -sk -o /dev/null -w '%{http_code}' -X POST "https://127.0.0.1:$port$PATH_CHAT" \
    -H "api-key: $KEY" -H 'content-type: application/json' -d '{"messages":[]}')
  [ "$code" = 200 ] || { echo "target on port $port answered $code" >&2; cat "$DIR"/gw*.err >&2; exit 1; }
done

# Both must speak the same TLS (1.3): a comparison of 1.2 against 1.3 handshakes is no comparison.
for port in "$NPORT" "${GPORT[@]}"; do
  proto=$(echo | openssl s_client -brief -connect "127.0.0.1:$port" 2>&1 | awk '/^Protocol version:/ {print $NF; exit}')
  [ "$proto" = TLSv1.3 ] || { echo "port $port negotiated '$proto', not TLSv1.3" >&2; exit 1; }
done

wrk_run() { # out port conns seconds [close]
  local hdr=()
  [ "${5:-}" = close ] && hdr=(-H "Connection: close")
  wrk -t1 -c"$3" -d"${4}s" --latency -s load-tests/post.lua "${hdr[@]}" "https://127.0.0.1:$2$PATH_CHAT" >"$1" 2>&1 || true
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
# The line of a result file whose first field is its median: med FILE -> "rps p50 p99 n errs"
med() { local m; m=$(cut -d' ' -f1 "$1" | median); grep "^$m " "$1" | head -1; }

echo
echo "== 1, 2: keep-alive and a handshake per request (c=10, medians of $ROUNDS alternating rounds; gateway: $DEFAULT_HS, i.e. pacing_handshakes-per-thread)"
for mode in keepalive close; do
  : >"$DIR/n-$mode.txt"; : >"$DIR/g-$mode.txt"
  for _ in $(seq 1 "$ROUNDS"); do
    wrk_run "$DIR/w" "$NPORT" 10 "$DURATION" "$([ $mode = close ] && echo close)"; wrk_fig "$DIR/w" >>"$DIR/n-$mode.txt"
    wrk_run "$DIR/w" "${GPORT[$DEFAULT_HS]}" 10 "$DURATION" "$([ $mode = close ] && echo close)"; wrk_fig "$DIR/w" >>"$DIR/g-$mode.txt"
  done
done
printf '%-26s %-30s %-30s %s\n' "case" "nginx RPS (p50/p99) errs" "gateway RPS (p50/p99) errs" "ratio"
for mode in keepalive close; do
  read -r nr n50 n99 _ ne < <(med "$DIR/n-$mode.txt"); read -r gr g50 g99 _ ge < <(med "$DIR/g-$mode.txt")
  printf '%-26s %-30s %-30s %s\n' "$([ $mode = close ] && echo 'handshake per request' || echo keep-alive)" \
    "$nr ($n50/$n99) $ne" "$gr ($g50/$g99) $ge" "$(ratio "$gr" "$nr")"
done

echo
echo "== 3: keep-alive c=10 during a handshake storm (c=64, Connection: close); ${DURATION}s measured, medians of $ROUNDS alternating rounds"
storm() { # name port
  wrk_run "$DIR/storm" "$2" 64 $((DURATION + 2)) close &
  local sp=$!; pids+=($sp)
  sleep 1
  wrk_run "$DIR/ka" "$2" 10 "$DURATION"
  wait "$sp"
  echo "$(wrk_fig "$DIR/ka") $(wrk_fig "$DIR/storm")" >>"$DIR/storm-$1.txt"
}
targets="nginx"; for v in $VARIANTS; do targets="$targets gw$v"; done
for t in $targets; do : >"$DIR/storm-$t.txt"; done
for _ in $(seq 1 "$ROUNDS"); do
  storm nginx "$NPORT"
  for v in $VARIANTS; do storm "gw$v" "${GPORT[$v]}"; done
done
read -r nka n50 _ _ _ nst _ _ _ nse < <(med "$DIR/storm-nginx.txt")
printf '%-34s %-24s %-10s %-22s %s\n' "target" "keep-alive RPS (p50)" "ka ratio" "storm handshakes/s" "storm ratio (errors)"
printf '%-34s %-24s %-10s %-22s %s\n' "nginx, 1 worker" "$nka ($n50)" "1.00" "$nst" "1.00 ($nse)"
for v in $VARIANTS; do
  read -r gka g50 _ _ _ gst _ _ _ gse < <(med "$DIR/storm-gw$v.txt")
  printf '%-34s %-24s %-10s %-22s %s\n' "gateway, $v" "$gka ($g50)" "$(ratio "$gka" "$nka")" "$gst" "$(ratio "$gst" "$nst") ($gse)"
done
echo "(every round, nginx then each gateway: keep-alive RPS / storm RPS)"
for t in $targets; do echo "  $t: $(awk '{printf "%s/%s  ", $1, $6}' "$DIR/storm-$t.txt")"; done

echo
echo "== the gateways' own counters and log"
for v in $VARIANTS; do
  m=$(curl -s "http://127.0.0.1:${GADMIN[$v]}/metrics" | grep -E '^aoai_gateway_downstream_(handshakes|errors)' | tr '\n' ' ')
  echo "$v: $m"
  echo "  RSS $(( $(rss_kib "${GPID[$v]}") / 1024 )) MiB; WARN/ERROR log lines: $(grep -cE 'WARN|ERROR' "$DIR/gw$v.err" || true)"
done
