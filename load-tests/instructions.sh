#!/usr/bin/env bash
# Instructions per request of the gateway, per thread, under callgrind: a measure that repeats
# to about 1 % on this machine, where wall-clock RPS moves ±20 % between runs of the same binary.
# Instrumentation is on only while wrk runs (after a warm-up), so start-up is not counted.
# Usage: load-tests/instructions.sh [BIN_DIR]   (default target/release)   env: DURATION=8,
#        CG_OUT=dir to keep the callgrind output, CG_OPTS="--cache-sim=yes --branch-sim=yes" to
#        simulate caches and branch prediction (the per-thread totals then list each event)
#        NGINX=1 load-tests/instructions.sh   counts the bare nginx proxy instead (its one
#        worker, run in the foreground with `master_process off`), the yardstick's figure.
#        NGINX=1 NGINX_LOG=1: the same nginx writing an access log line per request (JSON, the
#        fields an audit line has), for scale: the gateway's audit writer is a thread of its own.
# Needs valgrind (callgrind_control), nginx and wrk.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
DURATION=${DURATION:-8}
command -v valgrind >/dev/null && command -v nginx >/dev/null && command -v wrk >/dev/null ||
  { echo "needs valgrind, nginx and wrk" >&2; exit 1; }
. load-tests/common.sh
# The ports are fixed (gateway.yaml, the nginx confs) and the gateway listens with SO_REUSEPORT:
# a second run at the same time would silently split the load with this one.
for p in 18080 18090 18091 18092; do
  if (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null; then
    echo "port $p is in use (another load test running?): wait for it to end" >&2; exit 1
  fi
done
nginx -c "$DIR/mock.conf" -p "$DIR" & pids+=($!)
if [ "${NGINX:-0}" = 1 ]; then
  sed -i 's/^worker_processes 1;/worker_processes 1;\nmaster_process off;/' "$DIR/proxy.conf"
  if [ "${NGINX_LOG:-0}" = 1 ]; then nginx_access_log "$DIR/proxy.conf"; fi
  set -- nginx -c "$DIR/proxy.conf" -p "$DIR"; PORT=18090
else
  set -- "$BIN/aoai-gateway" run -c "$DIR/gateway.yaml"; PORT=18091
fi
# shellcheck disable=SC2086 # CG_OPTS: more callgrind options, e.g. "--cache-sim=yes --branch-sim=yes"
valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes ${CG_OPTS:-} \
  --callgrind-out-file="$DIR/cg.out" "$@" 2>"$DIR/vg.err" &
vg=$!; pids+=($vg)
for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.2; done
URL="http://127.0.0.1:$PORT/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
wrk -t1 -c10 -d3s -s load-tests/post.lua "$URL" >/dev/null
callgrind_control -i on "$vg" >/dev/null 2>&1
out=$(wrk -t1 -c10 -d"${DURATION}s" -s load-tests/post.lua "$URL")
callgrind_control -i off "$vg" >/dev/null 2>&1
callgrind_control -d "$vg" >/dev/null 2>&1
sleep 1
n=$(echo "$out" | awk '/requests in/ {print $1}')
echo "requests: $n"
for f in "$DIR"/cg.out.*-*; do
  ir=$(awk '/^totals:/ {s+=$2} END {print s+0}' "$f")
  [ "$ir" -gt $((n * 100)) ] || continue   # threads that did not work per request
  echo "thread $(awk '/^thread:/ {print $2; exit}' "$f"): $((ir / n)) instructions per request"
  if [ -n "${CG_OPTS:-}" ]; then
    awk -v n="$n" '/^events:/ {for (i = 2; i <= NF; i++) e[i] = $i}
      /^totals:/ {for (i = 2; i <= NF; i++) printf "  %s %.1f", e[i], $i / n; print " (per request)"}' "$f"
  fi
done
# CG_OUT=dir keeps the callgrind files (for callgrind_annotate, e.g. to compare two builds).
[ -n "${CG_OUT:-}" ] && mkdir -p "$CG_OUT" && cp "$DIR"/cg.out.* "$CG_OUT"/
if [ "${NGINX:-0}" = 1 ]; then
  [ "${NGINX_LOG:-0}" = 1 ] && echo "(access log: $(wc -l <"$DIR/access.log") lines)"
  exit 0
fi
echo "(the larger figure is the worker thread, the smaller the audit-log writer; the API key's"
echo " SHA-256 is not in it: a key already accepted is found by a fast hash, apikey.rs SeenKeys)"
