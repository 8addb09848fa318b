# Sourced by the load-test scripts: a scratch folder DIR, removed on exit together with every
# process whose pid is added to `pids`; the nginx mock and proxy and the gateway's
# configuration written into it (mock.conf, proxy.conf, gateway.yaml); the bench key KEY.
DIR=$(mktemp -d)
pids=()
cleanup() { [ -n "${KEEP_DIR:-}" ] && cp -r "$DIR" "$KEEP_DIR"; for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$DIR"; }
trap cleanup EXIT INT TERM

mkdir -p "$DIR"/{body,proxy,fcgi,uwsgi,scgi,pbody,pproxy,pfcgi,puwsgi,pscgi}
sed "s#__DIR__#$DIR#g" load-tests/nginx-mock.conf >"$DIR/mock.conf"
sed "s#__DIR__#$DIR#g" load-tests/nginx-proxy.conf >"$DIR/proxy.conf"
KEY=agw_bench-key-000000000000000000000000000000000
SHA=$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)
sed -e "s#__DIR__#$DIR#g" -e "s#__KEY_SHA256__#$SHA#" load-tests/gateway.yaml >"$DIR/gateway.yaml"

# NGINX_LOG=1 (bench.sh, instructions.sh): the yardstick proxy writes an access line a request,
# JSON with an audit line's fields, unbuffered as the gateway's audit log is written within
# ~10 ms: for a like-for-like figure beside the gateway's audit log (the bare proxy logs nothing).
nginx_access_log() { # proxy.conf path
  local fmt='{"ts":"$time_iso8601","request_id":"$request_id","client":"$remote_addr","method":"$request_method","path":"$uri","status":$status,"upstream":"$upstream_addr","duration_ms":$request_time,"upstream_ms":"$upstream_response_time","bytes":$body_bytes_sent}'
  sed -i "s#^  access_log off;#  log_format audit escape=json '$fmt';\n  access_log $DIR/access.log audit;#" "$1"
}

# --- Helpers of the issue-18 scripts (tls.sh, sse.sh, h2.sh, jwt.sh, fleet.sh): every port is a
# free ephemeral loopback port, every process is in `pids` (killed on exit).
need() { for t in "$@"; do command -v "$t" >/dev/null || { echo "needs $t (apt-get install it; see load-tests/README.md)" >&2; exit 1; }; done; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port [what]
  for _ in $(seq 1 300); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  echo "${2:-a server} never listened on port $1" >&2; exit 1
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }
nginx_worker() { # master pid -> its one worker's pid
  for _ in $(seq 1 50); do w=$(pgrep -P "$1" | head -1) && [ -n "$w" ] && { echo "$w"; return; }; sleep 0.1; done
  echo "nginx $1 has no worker" >&2; exit 1
}
# The nginx mock answering on PORT: start_nginx_mock PORT (sets mock_pid).
start_nginx_mock() {
  sed -e "s#127.0.0.1:18080#127.0.0.1:$1#" -e "s#/nginx\.pid#/mock-$1.pid#" -e "s#/error\.log#/mock-$1-error.log#" \
    "$DIR/mock.conf" >"$DIR/mock-$1.conf"
  nginx -c "$DIR/mock-$1.conf" -p "$DIR" & pids+=($!); mock_pid=$!
  wait_port "$1" "the nginx mock"
}
# The yardstick proxy (nginx-proxy.conf, one worker) on LISTEN in front of UPSTREAM (host:port);
# SSL=1 adds TLS with $DIR/cert.pem and TLS 1.3 (nginx 1.22 offers only up to 1.2 by default; the gateway 1.3) ($SSL_LISTEN_EXTRA, e.g. "http2", after `ssl`).
# start_nginx_proxy NAME PORT UPSTREAM (sets proxy_pid to the master, proxy_worker to its worker).
start_nginx_proxy() {
  local listen="listen 127.0.0.1:$2 backlog=4096;"
  if [ "${SSL:-0}" = 1 ]; then listen="listen 127.0.0.1:$2 ssl ${SSL_LISTEN_EXTRA:-} backlog=4096; ssl_certificate $DIR/cert.pem; ssl_certificate_key $DIR/key.pem; ssl_protocols TLSv1.2 TLSv1.3;"; fi
  sed -e "s#listen 127.0.0.1:18090 backlog=4096;#$listen#" -e "s#server 127.0.0.1:18080;#server $3;#" \
    -e "s#/proxy\.pid#/$1.pid#" -e "s#/proxy-error\.log#/$1-error.log#" "$DIR/proxy.conf" >"$DIR/$1.conf"
  nginx -c "$DIR/$1.conf" -p "$DIR" & pids+=($!); proxy_pid=$!
  wait_port "$2" "nginx $1"; proxy_worker=$(nginx_worker "$proxy_pid")
}
# A self-signed RSA-2048 server certificate for 127.0.0.1 in $DIR/cert.pem, $DIR/key.pem.
make_cert() {
  openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -days 2 -keyout "$DIR/key.pem" -out "$DIR/cert.pem" 2>/dev/null
}
# The bench gateway's configuration (gateway.yaml's client, deployments and audit log) written to
# $DIR/NAME.yaml: gateway_yaml NAME PORT ADMIN_PORT BACKEND_URL. Env: TLS=1 (the listener uses
# $DIR/cert.pem), SERVER_EXTRA (more `server:` lines, indented 2), HEALTH_PATH (default the nginx
# mock's /health), CLIENT_EXTRA (more lines of the client, indented 4), TOP_EXTRA (top-level YAML).
gateway_yaml() {
  {
    echo "server:"
    echo "  listeners:"
    echo "    - address: 127.0.0.1:$2"
    if [ "${TLS:-0}" = 1 ]; then printf '      tls:\n        certificate: %s\n        private_key: %s\n' "$DIR/cert.pem" "$DIR/key.pem"; fi
    echo "  admin_address: 127.0.0.1:$3"
    echo "  threads: 1"
    if [ -n "${SERVER_EXTRA:-}" ]; then printf '%s\n' "$SERVER_EXTRA"; fi
    echo "clients:"
    echo "  - id: bench"
    echo "    api_keys:"
    echo "      - sha256: $SHA"
    echo '    allow: {deployments: ["*"], operations: ["*"]}'
    if [ -n "${CLIENT_EXTRA:-}" ]; then printf '%s\n' "$CLIENT_EXTRA"; fi
    printf 'deployments:\n  gpt-4o:\n    - backend: mock\n  gpt-4o-sse:\n    - backend: mock\n'
    printf 'backends:\n  - name: mock\n    url: %s\n    region: local\n    credential: api_key\n    api_key: bench-backend-key\n' "$4"
    printf 'health_checks:\n  path: %s\n' "${HEALTH_PATH:-/health}"
    printf 'audit_log:\n  path: %s\n' "$DIR/$1-audit.log"
    if [ -n "${TOP_EXTRA:-}" ]; then printf '%s\n' "$TOP_EXTRA"; fi
  } >"$DIR/$1.yaml"
}
# start_gateway NAME PORT (after gateway_yaml; sets gw_pid; waits for its listener, fails with its log).
start_gateway() {
  "$BIN/aoai-gateway" run -c "$DIR/$1.yaml" 2>"$DIR/$1.err" & pids+=($!); gw_pid=$!
  for _ in $(seq 1 300); do
    (exec 3<>/dev/tcp/127.0.0.1/"$2") 2>/dev/null && return 0
    kill -0 "$gw_pid" 2>/dev/null || { echo "the gateway $1 exited:" >&2; cat "$DIR/$1.err" >&2; exit 1; }
    sleep 0.1
  done
  echo "the gateway $1 never listened on port $2" >&2; exit 1
}
stop_pid() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }
# wrk's figures from a report file: wrk_fig FILE -> "rps p50 p99 requests non2xx+socket-errors"
wrk_fig() {
  awk '/^Requests\/sec/ {r=$2} $1=="50%" {p50=$2} $1=="99%" {p99=$2} /requests in/ {n=$1}
       /Non-2xx/ {e+=$NF} /Socket errors/ {gsub(",",""); e+=$4+$6+$8+$10}
       END {printf "%s %s %s %s %d\n", r, p50, p99, n, e}' "$1"
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a/b; else print "n/a"}'; }
load_note() { echo "date: $(date -u '+%Y-%m-%d %H:%M UTC'); load average: $(cut -d' ' -f1-3 /proc/loadavg); $(nproc) cores"; }
