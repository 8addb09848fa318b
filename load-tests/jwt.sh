#!/usr/bin/env bash
# JWT auth: the gateway (1 thread) vs nginx (1 worker, which checks nothing), the same nginx
# mock behind both, wrk -t1 -c10 with `Authorization: Bearer` tokens taken in turn from a file
# (jwt.lua): one token, 10,000 and 100,000 distinct tokens (RS256, one RSA-2048 key whose JWKS
# the gateway reads from `jwks_url` on loopback). The gateway's cache of verified tokens is
# `identity.token_cache_entries` (default 65,536). The RSA-2048 verify ceiling is measured in
# the same run: `openssl speed rsa2048` gives the verify cost v, the one-token run the cost of
# a request without a verify (1/R1), so ceiling = 1 / (1/R1 + v).
# Goals (issue 18): 10,000 tokens >= 0.9x the one-token rate; 100,000 tokens >= 0.9x the ceiling.
# Each case: a warm-up pass (every token seen once, not measured), then ROUNDS alternating
# nginx/gateway runs. jwt.lua formats every request before wrk's clock starts, so the load tool's
# cost per request does not depend on the number of tokens. The gateway's runs continue one cycle
# through the tokens (JWT_START: each run starts after the last token the previous one sent), so
# 100,000 tokens through a 65,536-entry cache miss on every request, and 10,000 hit on every
# request after the warm-up; the gateway's own hit and miss counts (`/status`
# `oidc_token_cache`) over the measured rounds are printed to show it.
# Usage: load-tests/jwt.sh [BIN_DIR]   (default target/release)
#   env: ROUNDS=3 DURATION=5 (s) COUNTS="1 10000 100000"
#        STORM=1: after the cases, ROUNDS runs of one-token clients beside clients presenting
#        new tokens (the largest count, when it is over the cache): the cached clients' rate
#        during a miss storm against their rate alone
#        CACHE_ENTRIES=65536 (identity.token_cache_entries; 0: every request verifies its token,
#        so COUNTS=1 measures a verify on every request without any cache work)
#        VERIFY_THREADS=1 (identity.verify_threads: the threads that check the signatures of
#        tokens not in the cache; 0 checks them on the event loop)
#        JWT_CACHE=dir keeps the signed tokens there and reuses them while younger than 2 h
#        (signing 100,000 takes ~30 s of CPU)
#        CALLGRIND=1: no wall clock; the gateway runs under valgrind's callgrind and each case
#        prints the worker thread's instructions per request (a warm-up that presents every
#        token of a case that fits the cache first, uninstrumented; then one instrumented wrk
#        run of DURATION s), with its hits and misses. CG_OPTS adds callgrind options (e.g.
#        --cache-sim=yes), CG_OUT=dir keeps the callgrind files (cg-COUNT/) for callgrind_annotate.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
COUNTS=${COUNTS:-"1 10000 100000"}
VERIFY_THREADS=${VERIFY_THREADS:-1}
CACHE_ENTRIES=${CACHE_ENTRIES:-65536}
[ -x "$BIN/aoai-gateway" ] || { echo "no $BIN/aoai-gateway (cargo build --release)" >&2; exit 1; }
. load-tests/common.sh
need nginx wrk openssl curl python3
python3 -c 'import jwt, cryptography' 2>/dev/null || { echo "needs PyJWT and cryptography (pip install -r tests/integration/requirements.txt)" >&2; exit 1; }
load_note
MAX=$(echo "$COUNTS" | tr ' ' '\n' | sort -n | tail -1)
ISSUER=https://bench-issuer.invalid/v2.0
TOK=$DIR/tokens
if [ -n "${JWT_CACHE:-}" ] && [ -f "$JWT_CACHE/tokens.txt" ] && [ "$(wc -l <"$JWT_CACHE/tokens.txt")" -ge "$MAX" ] &&
   [ -n "$(find "$JWT_CACHE/tokens.txt" -mmin -120)" ]; then
  TOK=$JWT_CACHE; echo "tokens: reused from $JWT_CACHE"
else
  [ -n "${JWT_CACHE:-}" ] && TOK=$JWT_CACHE
  mkdir -p "$TOK"; t0=$(date +%s)
  python3 load-tests/jwt_tokens.py "$TOK" "$MAX" "$ISSUER" 10800
  echo "tokens: $MAX signed in $(( $(date +%s) - t0 )) s"
fi
JWKS_PORT=$(free_port)
mkdir -p "$DIR/jwks"; cp "$TOK/jwks.json" "$DIR/jwks/"
python3 -m http.server "$JWKS_PORT" --bind 127.0.0.1 --directory "$DIR/jwks" >/dev/null 2>&1 & pids+=($!)
wait_port "$JWKS_PORT" "the JWKS server"

MOCK=$(free_port); start_nginx_mock "$MOCK"
NPORT=$(free_port); start_nginx_proxy pjwt "$NPORT" "127.0.0.1:$MOCK"
GPORT=$(free_port); GADMIN=$(free_port)
CLIENT_EXTRA=$(printf '    tokens:\n      - provider: bench\n        client: bench-app')
TOP_EXTRA=$(printf 'identity:\n  verify_threads: %s\n  token_cache_entries: %s\n  oidc:\n    - name: bench\n      issuer: %s\n      audiences: [api://aoai-gateway]\n      jwks_url: http://127.0.0.1:%s/jwks.json\n      algorithms: [RS256]\n      client_claim: azp' "$VERIFY_THREADS" "$CACHE_ENTRIES" "$ISSUER" "$JWKS_PORT")
CLIENT_EXTRA=$CLIENT_EXTRA TOP_EXTRA=$TOP_EXTRA gateway_yaml gw "$GPORT" "$GADMIN" "http://127.0.0.1:$MOCK"
if [ "${CALLGRIND:-0}" = 1 ]; then
  need valgrind callgrind_control
  # shellcheck disable=SC2086
  valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes ${CG_OPTS:-} \
    --callgrind-out-file="$DIR/cg.out" "$BIN/aoai-gateway" run -c "$DIR/gw.yaml" 2>"$DIR/gw.err" & pids+=($!); gw_pid=$!
  for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/"$GPORT") 2>/dev/null && break; sleep 0.2; done
else
  start_gateway gw "$GPORT"
fi
PATH_CHAT=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
first=$(head -1 "$TOK/tokens.txt")
for port in "$NPORT" "$GPORT"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:$port$PATH_CHAT" \
    -H "authorization: Bearer $first" -H 'content-type: application/json' -d '{"messages":[]}')
  [ "$code" = 200 ] || { echo "target on port $port answered $code to a token" >&2; cat "$DIR/gw.err" >&2; exit 1; }
done

wrk_run() { # out port count seconds [first token offset]
  JWT_TOKENS=$TOK/tokens.txt JWT_COUNT=$3 JWT_START=${5:-0} wrk -t1 -c10 -d"${4}s" --latency -s load-tests/jwt.lua \
    "http://127.0.0.1:$2$PATH_CHAT" >"$1" 2>&1 || true
}
# The gateway's token-cache counters: "hits misses" (from /status; "0 0" from a build without them).
cache_counts() {
  curl -s "http://127.0.0.1:$GADMIN/status" | python3 -c \
    'import json,sys; c=json.load(sys.stdin).get("oidc_token_cache") or {}; print(c.get("hits", 0), c.get("misses", 0))'
}
hits_misses() { [ "$1 $2" = "0 0" ] && echo "n/a" || echo "$1 / $2"; }
# CPU time (user + system, clock ticks) the gateway process has used.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$gw_pid/stat"; }
TCK=$(getconf CLK_TCK)
# A gateway run that continues the cycle: gw_run OUT COUNT SECONDS (advances gstart; appends the
# gateway's CPU microseconds per request of the run to $DIR/cpu-COUNT.txt).
gw_run() {
  local t0; t0=$(cpu_ticks)
  wrk_run "$1" "$GPORT" "$2" "$3" "$gstart"
  local reqs; reqs=$(wrk_fig "$1" | cut -d' ' -f4)
  gstart=$(( gstart + reqs ))
  awk -v t="$(( $(cpu_ticks) - t0 ))" -v k="$TCK" -v r="$reqs" 'BEGIN {if (r > 0) printf "%.1f\n", t * 1e6 / k / r}' >>"$DIR/cpu-$2.txt"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
med() { local m; m=$(cut -d' ' -f1 "$1" | median); grep "^$m " "$1" | head -1; }

if [ "${CALLGRIND:-0}" = 1 ]; then
  printf '%-16s %-34s %s\n' "tokens cycling" "instructions per request (worker)" "hits / misses (measured run)"
  for n in $COUNTS; do
    gstart=0; sent=0
    # Warm-up, uninstrumented: every token once when they fit the cache (a longer cycle misses anyway).
    while [ "$sent" -lt "$n" ] && [ "$n" -le 65536 ] || [ "$sent" = 0 ]; do
      gw_run "$DIR/w" "$n" 5; sent=$gstart
    done
    read -r h0 m0 < <(cache_counts)
    callgrind_control -i on "$gw_pid" >/dev/null 2>&1
    gw_run "$DIR/w" "$n" "$DURATION"
    callgrind_control -i off "$gw_pid" >/dev/null 2>&1
    read -r h1 m1 < <(cache_counts)
    callgrind_control -d "$gw_pid" >/dev/null 2>&1; sleep 1
    mkdir -p "$DIR/cg-$n"; mv "$DIR"/cg.out.* "$DIR/cg-$n/" 2>/dev/null || true
    reqs=$(wrk_fig "$DIR/w" | cut -d' ' -f4)
    best=0
    for f in "$DIR/cg-$n"/cg.out.*; do
      ir=$(awk '/^totals:/ {s+=$2} END {print s+0}' "$f"); [ "$ir" -gt "$best" ] && best=$ir
    done
    printf '%-16s %-34s %s\n' "$n" "$(( best / reqs )) ($reqs requests)" "$(hits_misses $((h1 - h0)) $((m1 - m0)))"
  done
  [ -n "${CG_OUT:-}" ] && mkdir -p "$CG_OUT" && cp -r "$DIR"/cg-* "$CG_OUT"/
  exit 0
fi

for n in $COUNTS; do
  : >"$DIR/n-$n.txt"; : >"$DIR/g-$n.txt"
  # Warm-up, not measured: long enough for every token to be presented once at ~10k requests/s.
  gstart=0
  gw_run "$DIR/w" "$n" $(( n / 8000 + 2 )); : >"$DIR/cpu-$n.txt"
  read -r h0 m0 < <(cache_counts)
  for _ in $(seq 1 "$ROUNDS"); do
    wrk_run "$DIR/w" "$NPORT" "$n" "$DURATION"; wrk_fig "$DIR/w" >>"$DIR/n-$n.txt"
    gw_run "$DIR/w" "$n" "$DURATION"; wrk_fig "$DIR/w" >>"$DIR/g-$n.txt"
  done
  read -r h1 m1 < <(cache_counts)
  hits_misses $((h1 - h0)) $((m1 - m0)) >"$DIR/c-$n.txt"
done
# A miss storm (STORM=1, the default, when the largest count is over the cache): ROUNDS runs
# of ten one-token clients (their token cached) beside ten clients presenting new tokens
# (continuing the largest count's cycle), at once; the one-token clients' rate is then
# compared with their rate alone above.
storm=0
if [ "${STORM:-1}" = 1 ] && [ "$MAX" -gt 65536 ]; then
  storm=1; : >"$DIR/sa.txt"; : >"$DIR/sb.txt"
  read -r h0 m0 < <(cache_counts)
  for _ in $(seq 1 "$ROUNDS"); do
    wrk_run "$DIR/sa" "$GPORT" 1 "$DURATION" & apid=$!
    wrk_run "$DIR/sb" "$GPORT" "$MAX" "$DURATION" "$gstart"; wait "$apid"
    gstart=$(( gstart + $(wrk_fig "$DIR/sb" | cut -d' ' -f4) ))
    wrk_fig "$DIR/sa" >>"$DIR/sa.txt"; wrk_fig "$DIR/sb" >>"$DIR/sb.txt"
  done
  read -r h1 m1 < <(cache_counts)
  hits_misses $((h1 - h0)) $((m1 - m0)) >"$DIR/sc.txt"
fi
verify_s=$(openssl speed -seconds 3 rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print $NF}')
echo
echo "identity.verify_threads: $VERIFY_THREADS, token_cache_entries: $CACHE_ENTRIES"
printf '%-15s %-28s %-28s %-8s %-22s %-22s %s\n' "tokens cycling" "nginx RPS (p50/p99) errs" "gateway RPS (p50/p99) errs" "/ nginx" "gateway hits / misses" "gateway CPU us/request" "rounds (gateway; nginx)"
for n in $COUNTS; do
  cpu=$(median <"$DIR/cpu-$n.txt"); eval "C_$n=$cpu"
  read -r nr n50 n99 _ ne < <(med "$DIR/n-$n.txt"); read -r gr g50 g99 _ ge < <(med "$DIR/g-$n.txt")
  printf '%-15s %-28s %-28s %-8s %-22s %-22s %s\n' "$n" "$nr ($n50/$n99) $ne" "$gr ($g50/$g99) $ge" "$(ratio "$gr" "$nr")" \
    "$(cat "$DIR/c-$n.txt")" "$cpu" "$(cut -d' ' -f1 "$DIR/g-$n.txt" | tr '\n' ' '); $(cut -d' ' -f1 "$DIR/n-$n.txt" | tr '\n' ' ')"
  eval "G_$n=$gr"; eval "N_$n=$nr"
done
first_n=$(echo "$COUNTS" | awk '{print $1}')
r1=$(eval echo "\$G_$first_n")
echo
echo "openssl speed rsa2048: $verify_s verifies/s ($(awk -v v="$verify_s" 'BEGIN {printf "%.1f", 1e6/v}') us each)"
ceiling=$(awk -v r="$r1" -v v="$verify_s" 'BEGIN {printf "%.0f", 1/(1/r + 1/v)}')
echo "ceiling = 1/(1/$r1 + 1/$verify_s) = $ceiling requests/s"
[ -n "${G_10000:-}" ] && echo "10,000 tokens / one token: $(ratio "$G_10000" "$r1")  (goal >= 0.9; nginx, which checks nothing, $(ratio "$N_10000" "$(eval echo "\$N_$first_n")"): the load tool's own share)"
[ -n "${G_100000:-}" ] && echo "100,000 tokens / ceiling: $(ratio "$G_100000" "$ceiling")  (goal >= 0.9)"
[ -n "${C_100000:-}" ] && echo "gateway CPU per request, 100,000 tokens - one token: $(awk -v a="$C_100000" -v b="$(eval echo "\$C_$first_n")" 'BEGIN {printf "%.1f", a - b}') us (the cost of a miss; openssl's verify above)"
if [ "$storm" = 1 ]; then
  read -r sa a50 a99 _ _ < <(med "$DIR/sa.txt"); read -r sb _ _ _ _ < <(med "$DIR/sb.txt")
  echo "miss storm: one-token clients $sa/s (p50 $a50, p99 $a99) = $(ratio "$sa" "$r1") of their rate alone, beside $sb/s of $MAX tokens cycling (hits / misses $(cat "$DIR/sc.txt"); rounds: $(cut -d' ' -f1 "$DIR/sa.txt" | tr '\n' ' '))"
fi
echo "gateway: RSS $(( $(rss_kib "$gw_pid") / 1024 )) MiB; WARN/ERROR log lines: $(grep -cE 'WARN|ERROR' "$DIR/gw.err" || true)"
echo "audit lines by status:"; grep -o '"status":[0-9]*' "$DIR/gw-audit.log" | sort | uniq -c | sort -rn | head -5
