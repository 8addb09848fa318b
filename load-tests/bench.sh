#!/usr/bin/env bash
# Gateway vs a bare nginx reverse proxy, same machine, same mock (nginx answering canned Azure
# OpenAI JSON), same load: wrk -t1 at 1, 10 and 64 connections. Targets alternate, each point
# is repeated ROUNDS times; medians are printed with the gateway/nginx ratio, and each one's CPU
# time (user + system, /proc, all of the gateway's threads; nginx's one worker) per request.
# Usage: load-tests/bench.sh [BIN_DIR]   (default target/release)   env: ROUNDS=3 DURATION=10s
#   NGINX_LOG=1: nginx writes a JSON access line a request (common.sh), as the gateway its audit log.
#   BARE=1 adds a column for Pingora's own proxy doing nothing (BIN_DIR/examples/bare_pingora,
#   `cargo build --release --example bare_pingora`): the framework's floor, for reference.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-"1 10 64"}
BARE=${BARE:-0}
command -v nginx >/dev/null && command -v wrk >/dev/null || { echo "needs nginx and wrk (make deps)" >&2; exit 1; }
. load-tests/common.sh

nginx -c "$DIR/mock.conf" -p "$DIR" & pids+=($!)
if [ "${NGINX_LOG:-0}" = 1 ]; then nginx_access_log "$DIR/proxy.conf"; fi
nginx -c "$DIR/proxy.conf" -p "$DIR" & pids+=($!)
proxy_master=$!
"$BIN/aoai-gateway" run -c "$DIR/gateway.yaml" 2>"$DIR/gateway.err" & pids+=($!)
gw_pid=$!
ports="18080 18090 18091"
if [ "$BARE" = 1 ]; then
  [ -x "$BIN/examples/bare_pingora" ] || { echo "BARE=1 needs $BIN/examples/bare_pingora" >&2; exit 1; }
  "$BIN/examples/bare_pingora" 127.0.0.1:18093 127.0.0.1:18080 2>"$DIR/bare.err" & pids+=($!); bare_pid=$!
  ports="$ports 18093"
fi
for port in $ports; do
  for _ in $(seq 1 100); do (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
done
PATH_CHAT=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
nginx_pid=$(nginx_worker "$proxy_master")
# Sanity: both answer the same request with 200.
for port in 18090 18091; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port$PATH_CHAT" \
    -H "api-key: $KEY" -H 'content-type: application/json' -d '{"messages":[]}')
  [ "$code" = 200 ] || { echo "target on port $port answered $code"; cat "$DIR/gateway.err"; exit 1; }
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # port conns pid -> "rps p50 p99 cpu-µs-a-request"
  local t0 t1
  t0=$(cpu_ticks "$3")
  wrk -t1 -c"$2" -d"$DURATION" --latency -s load-tests/post.lua "http://127.0.0.1:$1$PATH_CHAT" >"$DIR/wrk.out" 2>&1
  t1=$(cpu_ticks "$3")
  local rps p50 p99 errs n cpu
  rps=$(awk '/^Requests\/sec/ {print $2}' "$DIR/wrk.out")
  p50=$(awk '$1=="50%" {print $2}' "$DIR/wrk.out")
  p99=$(awk '$1=="99%" {print $2}' "$DIR/wrk.out")
  errs=$(awk '/Non-2xx|Socket errors/ {print}' "$DIR/wrk.out")
  [ -z "$errs" ] || echo "  (port $1 c=$2: $errs)" >&2
  n=$(awk '/requests in/ {print $1}' "$DIR/wrk.out")
  cpu=$(awk -v t=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$n" 'BEGIN {printf "%.1f", t / hz * 1e6 / n}')
  echo "$rps $p50 $p99 $cpu"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '\n%-8s %-28s %-28s %-6s %s' "conns" "nginx RPS (p50/p99)" "gateway RPS (p50/p99)" "ratio" "CPU µs a request: nginx / gateway (ratio)"
[ "$BARE" = 1 ] && printf '   %-28s %s' "bare Pingora RPS (p50/p99)" "ratio"
echo
for c in $CONNS; do
  : >"$DIR/n.txt"; : >"$DIR/g.txt"; : >"$DIR/b.txt"
  for _ in $(seq 1 "$ROUNDS"); do
    run 18090 "$c" "$nginx_pid" >>"$DIR/n.txt"
    run 18091 "$c" "$gw_pid" >>"$DIR/g.txt"
    [ "$BARE" = 1 ] && run 18093 "$c" "$bare_pid" >>"$DIR/b.txt"
  done
  n=$(cut -d' ' -f1 "$DIR/n.txt" | median); g=$(cut -d' ' -f1 "$DIR/g.txt" | median)
  nl=$(grep "^$n " "$DIR/n.txt" | head -1 | cut -d' ' -f2-3 | tr ' ' /)
  gl=$(grep "^$g " "$DIR/g.txt" | head -1 | cut -d' ' -f2-3 | tr ' ' /)
  ratio=$(awk -v a="$g" -v b="$n" 'BEGIN {printf "%.2f", a/b}')
  nc=$(cut -d' ' -f4 "$DIR/n.txt" | median); gc=$(cut -d' ' -f4 "$DIR/g.txt" | median)
  printf '%-8s %-28s %-28s %-6s %s' "c=$c" "$n ($nl)" "$g ($gl)" "$ratio" \
    "$nc / $gc ($(awk -v a="$gc" -v b="$nc" 'BEGIN {printf "%.2f", a/b}'))"
  if [ "$BARE" = 1 ]; then
    b=$(cut -d' ' -f1 "$DIR/b.txt" | median)
    bl=$(grep "^$b " "$DIR/b.txt" | head -1 | cut -d' ' -f2-3 | tr ' ' /)
    printf '   %-28s %s' "$b ($bl)" "$(awk -v a="$b" -v b="$n" 'BEGIN {printf "%.2f", a/b}')"
  fi
  echo
done
rss=$(ps -o rss= -p "$gw_pid" | tr -d ' ')
echo
echo "gateway RSS after the run: $((rss / 1024)) MiB; audit lines written: $(wc -l <"$DIR/audit.log")"
if [ "${NGINX_LOG:-0}" = 1 ]; then echo "nginx access lines written: $(wc -l <"$DIR/access.log")"; fi
echo "gateway answers by status (from the audit log):"
grep -o '"status":[0-9]*,"error_code":[^,]*' "$DIR/audit.log" | sort | uniq -c | sort -rn | head -5
