-- A short chat request, as the SDK sends it, with a gateway-issued key.
wrk.method = "POST"
wrk.headers["content-type"] = "application/json"
wrk.headers["api-key"] = "agw_bench-key-000000000000000000000000000000000"
wrk.body = '{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in five words."}],"max_tokens":32}'
