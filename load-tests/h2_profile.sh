#!/usr/bin/env bash
# HTTP/2 per request, the gateway against nginx (`listen ... ssl http2`), in counts that do not
# depend on the machine's load: instructions per request per thread under callgrind, and write
# syscalls per request under `strace -f -yy` (downstream TLS writes told apart from the writes
# to the upstream mock), each after a warm-up, for both of h2.sh's cases: one stream per
# connection (h2load -c10 -m1) and multiplexed (-c2 -m32). h2load sends exactly N requests
# (-n), so per request = total / N.
# Usage: load-tests/h2_profile.sh [BIN_DIR]   (default target/release)
#   env: N=4000 (requests per measured run), MODE="callgrind strace" (and/or cpu: user+system
#        CPU time of the process per request, natively; use a large N, e.g. 100000; perf: a
#        native profile with the software clock into PERF_OUT=dir), TARGETS="gateway nginx",
#        CASES="10x1 2x32", CG_OUT=dir (keep the callgrind files for callgrind_annotate)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release}
N=${N:-4000}
MODE=${MODE:-callgrind strace}
TARGETS=${TARGETS:-gateway nginx}
CASES=${CASES:-10x1 2x32}
[ -x "$BIN/aoai-gateway" ] || { echo "no $BIN/aoai-gateway" >&2; exit 1; }
. load-tests/common.sh
need nginx h2load openssl valgrind callgrind_control strace python3
load_note
make_cert
MOCK=$(free_port); start_nginx_mock "$MOCK"
PATH_CHAT=/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21
sed -n "s/^wrk.body = '\(.*\)'$/\1/p" load-tests/post.lua >"$DIR/body.json"

load() { # port conns streams requests
  h2load -c "$2" -m "$3" -n "$4" -d "$DIR/body.json" -H "api-key: $KEY" \
    -H 'content-type: application/json' "https://127.0.0.1:$1$PATH_CHAT" >"$DIR/h2.out" 2>&1 || true
  local ok; ok=$(awk '/^status codes:/ {gsub(",",""); print $3}' "$DIR/h2.out")
  [ "$ok" = "$4" ] || { echo "h2load: $ok of $4 answered 2xx" >&2; tail -8 "$DIR/h2.out" >&2; exit 1; }
}

# start TARGET WRAPPER... -> sets tpid (the process measured) and tport
start() {
  local t=$1; shift
  tport=$(free_port)
  if [ "$t" = nginx ]; then
    SSL=1 SSL_LISTEN_EXTRA=http2 start_nginx_proxy ph2 "$tport" "127.0.0.1:$MOCK"
    # measure one process: the worker alone in the foreground (master_process off)
    stop_pid "$proxy_pid"; sleep 0.3
    sed -i 's/^worker_processes 1;/worker_processes 1;\nmaster_process off;/' "$DIR/ph2.conf"
    "$@" nginx -c "$DIR/ph2.conf" -p "$DIR" 2>"$DIR/target.err" & tpid=$!; pids+=($tpid)
  else
    TLS=1 gateway_yaml gw "$tport" "$(free_port)" "http://127.0.0.1:$MOCK"
    "$@" "$BIN/aoai-gateway" run -c "$DIR/gw.yaml" 2>"$DIR/target.err" & tpid=$!; pids+=($tpid)
  fi
  for _ in $(seq 1 600); do (exec 3<>/dev/tcp/127.0.0.1/"$tport") 2>/dev/null && return 0; sleep 0.1; done
  echo "$t never listened" >&2; cat "$DIR/target.err" >&2; exit 1
}

for t in $TARGETS; do
  for c in $CASES; do
    conns=${c%x*}; streams=${c#*x}
    for m in $MODE; do
      if [ "$m" = callgrind ]; then
        start "$t" valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes \
          --callgrind-out-file="$DIR/cg.out"
        load "$tport" "$conns" "$streams" 2000
        callgrind_control -i on "$tpid" >/dev/null 2>&1
        load "$tport" "$conns" "$streams" "$N"
        callgrind_control -i off "$tpid" >/dev/null 2>&1
        callgrind_control -d "$tpid" >/dev/null 2>&1
        sleep 1
        line="$t $c callgrind:"
        total=0; hs=0
        for f in "$DIR"/cg.out.*-*; do
          ir=$(awk '/^totals:/ {s+=$2} END {print s+0}' "$f")
          total=$((total + ir))
          [ "$ir" -gt $((N * 100)) ] || continue
          line="$line thread $(awk '/^thread:/ {print $2; exit}' "$f") $((ir / N));"
          # the TLS handshakes of the run's connections (h2load opens them in the measured run)
          h=$(callgrind_annotate --inclusive=yes "$f" 2>/dev/null | awk '/:SSL_do_handshake / && !n++ {gsub(",","",$1); print $1}')
          hs=$((hs + ${h:-0}))
        done
        echo "$line all threads $((total / N)) instructions per request; without the TLS handshakes $(((total - hs) / N))"
        if [ -n "${CG_OUT:-}" ]; then mkdir -p "$CG_OUT/$t-$c"; cp "$DIR"/cg.out.* "$CG_OUT/$t-$c/"; fi
        stop_pid "$tpid"; rm -f "$DIR"/cg.out*
      elif [ "$m" = perf ]; then
        # a native profile (software clock: no hardware counters needed) into PERF_OUT
        start "$t"
        load "$tport" "$conns" "$streams" 2000
        mkdir -p "${PERF_OUT:?set PERF_OUT=dir}"
        perf record -q -e cpu-clock -F ${PERF_HZ:-4000} --call-graph ${PERF_CG:-fp} -o "$PERF_OUT/$t-$c.data" -p "$tpid" 2>/dev/null &
        pf=$!; sleep 0.5
        load "$tport" "$conns" "$streams" "$N"
        kill -INT "$pf"; wait "$pf" 2>/dev/null || true
        echo "$t $c perf: $PERF_OUT/$t-$c.data"
        stop_pid "$tpid"
      elif [ "$m" = cpu ]; then
        # CPU time (user + system, from /proc/PID/stat) of the measured process per request
        start "$t"
        load "$tport" "$conns" "$streams" 2000
        t0=$(awk '{print $14 + $15}' "/proc/$tpid/stat")
        load "$tport" "$conns" "$streams" "$N"
        t1=$(awk '{print $14 + $15}' "/proc/$tpid/stat")
        echo "$t $c cpu: $(awk -v d=$((t1 - t0)) -v hz="$(getconf CLK_TCK)" -v n="$N" \
          'BEGIN {printf "%.2f µs per request (%d ticks)", d / hz * 1e6 / n, d}')"
        stop_pid "$tpid"
      else
        start "$t"
        load "$tport" "$conns" "$streams" 2000
        strace -f -qq -yy -e trace=write,writev,sendmsg,sendto,sendmmsg -o "$DIR/st.out" -p "$tpid" &
        st=$!; sleep 1
        load "$tport" "$conns" "$streams" "$N"
        sleep 0.5; kill -INT "$st"; wait "$st" 2>/dev/null || true
        # downstream: the TLS connections to the target's port; upstream: to the mock
        python3 - "$DIR/st.out" "$tport" "$MOCK" "$N" "$t $c strace:" <<'EOF'
import re, sys
path, port, mock, n, label = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
down = up = other = 0
down_bytes = 0
for line in open(path):
    m = re.search(r"(write|writev|sendmsg|sendto|sendmmsg)\((\d+)<((?:TCP|TCPv6|UDP|UNIX)[^\]]*\]|[^>]*)>", line)
    if not m:
        continue
    peer = m.group(3)
    r = re.search(r'=\s*(\d+)\s*$', line)
    if f'127.0.0.1:{port}->' in peer:
        down += 1
        down_bytes += int(r.group(1)) if r else 0
    elif f'->127.0.0.1:{mock}]' in peer:
        up += 1
    else:
        other += 1
print(f"{label} downstream writes {down / n:.3f} per request ({down_bytes / max(down, 1):.0f} bytes each), "
      f"upstream writes {up / n:.3f}, other writes {other / n:.3f} (audit log, logs)")
EOF
        stop_pid "$tpid"
      fi
    done
  done
done
