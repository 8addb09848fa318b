# Sourced by the load-test scripts: a scratch folder DIR, removed on exit together with every
# process whose pid is added to `pids`; the nginx mock and proxy and the gateway's
# configuration written into it (mock.conf, proxy.conf, gateway.yaml); the bench key KEY.
DIR=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; rm -rf "$DIR"; }
trap cleanup EXIT INT TERM

mkdir -p "$DIR"/{body,proxy,fcgi,uwsgi,scgi,pbody,pproxy,pfcgi,puwsgi,pscgi}
sed "s#__DIR__#$DIR#g" load-tests/nginx-mock.conf >"$DIR/mock.conf"
sed "s#__DIR__#$DIR#g" load-tests/nginx-proxy.conf >"$DIR/proxy.conf"
KEY=agw_bench-key-000000000000000000000000000000000
SHA=$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)
sed -e "s#__DIR__#$DIR#g" -e "s#__KEY_SHA256__#$SHA#" load-tests/gateway.yaml >"$DIR/gateway.yaml"
