#!/usr/bin/env bash
# One fleet (issue 16's load case): two gateways (1 thread each) sharing one real Redis
# (`state.store: redis`; the bench client has request, token and daily token limits, so every
# admission and reconciliation goes to Redis: at limits this high a per-minute reservation has
# drained before the answer and needs no correction, the day's has not), each behind its own wrk -t1 -c10 at the same time, against two
# nginx proxies (1 worker each) under the same two wrk; the same nginx mock behind all.
# Redis round trips per request: the calls of `INFO commandstats` (without INFO itself, and
# without the GET/SET that the limit scripts run inside Redis) before and after each gateway
# round, divided by the requests of that round; all commands per request beside. Alternating.
# Usage: load-tests/fleet.sh [BIN_DIR]   (default target/release)   env: ROUNDS=3 DURATION=5 (s)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
[ -x "$BIN/aoai-gateway" ] || { echo "no $BIN/aoai-gateway (cargo build --release)" >&2; exit 1; }
. load-tests/common.sh
need nginx wrk redis-server redis-cli curl python3
load_note
RPORT=$(free_port)
redis-server --port "$RPORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$DIR" >"$DIR/redis.log" 2>&1 & pids+=($!)
wait_port "$RPORT" "redis-server"
MOCK=$(free_port); start_nginx_mock "$MOCK"
NA=$(free_port); start_nginx_proxy pa "$NA" "127.0.0.1:$MOCK"
NB=$(free_port); start_nginx_proxy pb "$NB" "127.0.0.1:$MOCK"
CLIENT_EXTRA=$(printf '    limits:\n      requests_per_minute: 1000000000\n      tokens_per_minute: 1000000000000\n      tokens_per_day: 1000000000000000')
TOP_EXTRA=$(printf 'state:\n  store: redis\n  redis_url: redis://127.0.0.1:%s/0' "$RPORT")
GA=$(free_port); GB=$(free_port)
CLIENT_EXTRA=$CLIENT_EXTRA TOP_EXTRA=$TOP_EXTRA gateway_yaml gwa "$GA" "$(free_port)" "http://127.0.0.1:$MOCK"
CLIENT_EXTRA=$CLIENT_EXTRA TOP_EXTRA=$TOP_EXTRA gateway_yaml gwb "$GB" "$(free_port)" "http://127.0.0.1:$MOCK"
start_gateway gwa "$GA"; gwa_pid=$gw_pid
start_gateway gwb "$GB"; gwb_pid=$gw_pid
PATH_CHAT=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
for port in "$NA" "$NB" "$GA" "$GB"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port$PATH_CHAT" \
    -H "api-key: $KEY" -H 'content-type: application/json' -d '{"messages":[]}')
  [ "$code" = 200 ] || { echo "target on port $port answered $code" >&2; cat "$DIR"/gw*.err >&2; exit 1; }
done
# Commands Redis ran (without INFO itself), as "name calls" lines. Those that the limit scripts
# run inside Redis (GET, SET) are counted too: the round trips are the other ones (EVALSHA...).
redis_stats() { redis-cli -p "$RPORT" INFO commandstats | tr -d '\r' |
  awk -F'[:,=]' '/^cmdstat_/ && $1 != "cmdstat_info" {sub("cmdstat_", "", $1); print $1, $3}'; }
redis_calls() { redis_stats | awk '{s += $2} END {print s + 0}'; }
redis_trips() { redis_stats | awk '$1 != "get" && $1 != "set" {s += $2} END {print s + 0}'; }
[ "$(redis_calls)" -gt 0 ] || { echo "the gateways sent nothing to Redis: are the limits in Redis?" >&2; exit 1; }

pair() { # name portA portB -> "rpsA+rpsB p50A p50B requests errors"
  wrk -t1 -c10 -d"${DURATION}s" --latency -s load-tests/post.lua "http://127.0.0.1:$2$PATH_CHAT" >"$DIR/wa" 2>&1 &
  local wa=$!; pids+=($wa)
  wrk -t1 -c10 -d"${DURATION}s" --latency -s load-tests/post.lua "http://127.0.0.1:$3$PATH_CHAT" >"$DIR/wb" 2>&1 || true
  wait "$wa" || true
  read -r ra pa _ na ea < <(wrk_fig "$DIR/wa"); read -r rb pb _ nb eb < <(wrk_fig "$DIR/wb")
  echo "$(awk -v a="$ra" -v b="$rb" 'BEGIN {printf "%.0f", a+b}') $pa $pb $((na + nb)) $((ea + eb))"
}
: >"$DIR/n.txt"; : >"$DIR/g.txt"; : >"$DIR/calls.txt"
for _ in $(seq 1 "$ROUNDS"); do
  pair nginx "$NA" "$NB" >>"$DIR/n.txt"
  c0=$(redis_calls); t0=$(redis_trips)
  line=$(pair gw "$GA" "$GB"); echo "$line" >>"$DIR/g.txt"
  sleep 1   # reconciliations after the last answers
  c1=$(redis_calls); t1=$(redis_trips)
  echo "$((c1 - c0)) $(echo "$line" | cut -d' ' -f4) $((t1 - t0))" >>"$DIR/calls.txt"
done
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
med() { local m; m=$(cut -d' ' -f1 "$1" | median); grep "^$m " "$1" | head -1; }
read -r nr na50 nb50 _ ne < <(med "$DIR/n.txt"); read -r gr ga50 gb50 _ ge < <(med "$DIR/g.txt")
echo
printf '%-40s %-26s %-26s %s\n' "two targets, each wrk -t1 -c10 (medians)" "nginx x2: RPS (p50 a/b) errs" "gateway x2 + Redis: RPS (p50 a/b) errs" "ratio"
printf '%-40s %-26s %-26s %s\n' "sum of both" "$nr ($na50/$nb50) $ne" "$gr ($ga50/$gb50) $ge" "$(ratio "$gr" "$nr")"
echo "rounds: nginx $(cut -d' ' -f1 "$DIR/n.txt" | tr '\n' ' ')/ gateways $(cut -d' ' -f1 "$DIR/g.txt" | tr '\n' ' ')"
echo "Redis round trips per request (commands sent by the gateways): $(awk '{t+=$3; n+=$2} END {printf "%.2f (%d / %d requests)", t/n, t, n}' "$DIR/calls.txt")"
echo "Redis commands run per request (with the GET/SET inside the Lua scripts): $(awk '{c+=$1; n+=$2} END {printf "%.2f", c/n}' "$DIR/calls.txt")"
echo "Redis commands (whole run):"
redis-cli -p "$RPORT" INFO commandstats | tr -d '\r' | grep '^cmdstat_' | grep -v cmdstat_info | cut -d, -f1 | sed 's/^/  /'
echo "Redis CPU (s, whole run): $(redis-cli -p "$RPORT" INFO cpu | tr -d '\r' | awk -F: '/^used_cpu_(sys|user):/ {s+=$2} END {print s}')"
for g in gwa gwb; do
  pid=$([ $g = gwa ] && echo "$gwa_pid" || echo "$gwb_pid")
  echo "$g: RSS $(( $(rss_kib "$pid") / 1024 )) MiB; WARN/ERROR log lines: $(grep -cE 'WARN|ERROR' "$DIR/$g.err" || true); statuses: $(grep -o '"status":[0-9]*' "$DIR/$g-audit.log" | sort | uniq -c | tr -s ' ' | tr '\n' ' ')"
done
