#!/usr/bin/env bash
# HTTP/2 over TLS with h2load: the gateway (1 thread) vs nginx (1 worker, `listen ... ssl
# http2`), the same nginx mock behind both (HTTP/1.1 upstream), API-key auth, the chat body of
# post.lua. Two cases, targets alternating each round, medians printed with the ratio:
#   one stream per connection (c=10, m=1) and multiplexed (2 connections x 32 streams).
# Usage: load-tests/h2.sh [BIN_DIR]   (default target/release)   env: ROUNDS=3 DURATION=5 (s)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
[ -x "$BIN/aoai-gateway" ] || { echo "no $BIN/aoai-gateway (cargo build --release)" >&2; exit 1; }
. load-tests/common.sh
need nginx h2load openssl curl python3
load_note
make_cert
MOCK=$(free_port); start_nginx_mock "$MOCK"
NPORT=$(free_port); SSL=1 SSL_LISTEN_EXTRA=http2 start_nginx_proxy ph2 "$NPORT" "127.0.0.1:$MOCK"
GPORT=$(free_port); GADMIN=$(free_port)
TLS=1 gateway_yaml gw "$GPORT" "$GADMIN" "http://127.0.0.1:$MOCK"
start_gateway gw "$GPORT"
PATH_CHAT=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
sed -n "s/^wrk.body = '\(.*\)'$/\1/p" load-tests/post.lua >"$DIR/body.json"
for port in "$NPORT" "$GPORT"; do
  code=$(curl -sk --http2 -o /dev/null -w '%{http_code} %{http_version}' -X POST "https://127.0.0.1:$port$PATH_CHAT" \
    -H "api-key: $KEY" -H 'content-type: application/json' --data-binary @"$DIR/body.json")
  [ "$code" = "200 2" ] || { echo "target on port $port answered '$code' (want 200 over HTTP/2)" >&2; cat "$DIR/gw.err" >&2; exit 1; }
done

# Both must speak the same TLS (1.3): a comparison of 1.2 against 1.3 handshakes is no comparison.
for port in "$NPORT" "$GPORT"; do
  proto=$(echo | openssl s_client -brief -connect "127.0.0.1:$port" 2>&1 | awk '/^Protocol version:/ {print $NF; exit}')
  [ "$proto" = TLSv1.3 ] || { echo "port $port negotiated '$proto', not TLSv1.3" >&2; exit 1; }
done

h2() { # port conns streams -> "rps mean_latency failed+errored non2xx"
  h2load -c "$2" -m "$3" -D "$DURATION" --warm-up-time=1 -d "$DIR/body.json" \
    -H "api-key: $KEY" -H 'content-type: application/json' "https://127.0.0.1:$1$PATH_CHAT" >"$DIR/h2.out" 2>&1 || true
  awk '/^finished in/ {gsub(",",""); r=$4}
       /^requests:/ {bad=$10+$12}
       /^status codes:/ {gsub(",",""); non=$5+$7+$9}
       /^time for request:/ {lat=$6}
       END {printf "%s %s %d %d\n", r, lat, bad, non}' "$DIR/h2.out"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
med() { local m; m=$(cut -d' ' -f1 "$1" | median); grep "^$m " "$1" | head -1; }

printf '\n%-34s %-30s %-30s %s\n' "case (medians of $ROUNDS rounds)" "nginx req/s (mean) bad" "gateway req/s (mean) bad" "ratio"
for cm in "10 1" "2 32"; do
  set -- $cm
  : >"$DIR/n.txt"; : >"$DIR/g.txt"
  for _ in $(seq 1 "$ROUNDS"); do
    h2 "$NPORT" "$1" "$2" >>"$DIR/n.txt"
    h2 "$GPORT" "$1" "$2" >>"$DIR/g.txt"
  done
  read -r nr nl nb nn < <(med "$DIR/n.txt"); read -r gr gl gb gn < <(med "$DIR/g.txt")
  label="one stream per connection (c=$1)"; [ "$2" -gt 1 ] && label="multiplexed ($1 conns x $2 streams)"
  printf '%-34s %-30s %-30s %s\n' "$label" "$nr ($nl) $((nb + nn))" "$gr ($gl) $((gb + gn))" "$(ratio "$gr" "$nr")"
  echo "   rounds: nginx $(cut -d' ' -f1 "$DIR/n.txt" | tr '\n' ' ')/ gateway $(cut -d' ' -f1 "$DIR/g.txt" | tr '\n' ' ')"
done
echo
echo "gateway: RSS $(( $(rss_kib "$gw_pid") / 1024 )) MiB; WARN/ERROR log lines: $(grep -cE 'WARN|ERROR' "$DIR/gw.err" || true)"
grep -E 'WARN|ERROR' "$DIR/gw.err" | sed 's/^[^ ]* //' | cut -c1-160 | sort | uniq -c | sort -rn | head -3 || true
curl -s "http://127.0.0.1:$GADMIN/metrics" | grep -E '^aoai_gateway_downstream_errors_total' || true
echo "audit lines by status:"; grep -o '"status":[0-9]*' "$DIR/gw-audit.log" | sort | uniq -c | sort -rn | head -5
