#!/usr/bin/env bash
# `make run`: two aoai-mock "regions", the gateway on conf/demo.yaml in front of them, and the
# lines to try it. Ctrl-C stops everything.
set -euo pipefail
BIN=${1:-target/release}
KEY=agw_demo-key-for-make-run-only-0000000000000000
RUN=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$RUN"; }
trap cleanup EXIT INT TERM

for port in 8080 9464 18081 18082; do
  if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
    echo "port $port is already in use: stop what listens there (a previous 'make run'?) and try again" >&2
    exit 1
  fi
done

# eastus: only accepts the managed-identity token; it also serves that token (App Service protocol).
"$BIN/aoai-mock" --listen 127.0.0.1:18081 --name eastus --require-bearer mock-mi-token \
  --identity-token mock-mi-token --identity-header demo-identity-secret --chunk-delay-ms 150 >"$RUN/eastus.log" 2>&1 &
pids+=($!)
# swedencentral: only accepts its backend key.
"$BIN/aoai-mock" --listen 127.0.0.1:18082 --name swedencentral --require-api-key demo-sweden-key \
  --chunk-delay-ms 150 >"$RUN/sweden.log" 2>&1 &
pids+=($!)

export IDENTITY_ENDPOINT=http://127.0.0.1:18081/msi/token
export IDENTITY_HEADER=demo-identity-secret
export AOAI_SWEDEN_KEY=demo-sweden-key
"$BIN/aoai-gateway" run -c conf/demo.yaml &
pids+=($!)

for _ in $(seq 1 100); do
  curl -fs http://127.0.0.1:9464/healthz >/dev/null 2>&1 && break
  sleep 0.1
done

cat <<EOF

aoai-gateway is listening on http://127.0.0.1:8080 (admin: http://127.0.0.1:9464/metrics, /status)
in front of aoai-mock "eastus" (managed identity) and "swedencentral" (backend key).
The audit log goes to this terminal. Ctrl-C stops everything.

Try it:

curl -s "http://127.0.0.1:8080/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21" \\
  -H "api-key: $KEY" -H "content-type: application/json" \\
  -d '{"messages":[{"role":"user","content":"Hello!"}]}'

python3 - <<'PY'
from openai import AzureOpenAI
client = AzureOpenAI(azure_endpoint="http://127.0.0.1:8080", api_key="$KEY", api_version="2024-10-21")
r = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Hello!"}])
print(r.choices[0].message.content, r.usage)
for chunk in client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Stream, please"}], stream=True):
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
PY

A realtime (WebSocket) session with the SDK's realtime client (pip install websockets):

python3 - <<'RT'
from openai import AzureOpenAI
client = AzureOpenAI(azure_endpoint="http://127.0.0.1:8080", api_key="$KEY", api_version="2025-04-01-preview",
                     websocket_base_url="ws://127.0.0.1:8080/openai")
with client.realtime.connect(model="gpt-4o-realtime") as conn:
    conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
    conn.response.create()
    for event in conn:
        if event.type == "response.output_text.delta":
            print(event.delta, end="", flush=True)
        elif event.type == "response.done":
            print()
            print(event.response.usage)
            break
RT

EOF
wait
