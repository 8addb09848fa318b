-- wrk -t1 -c10 -d5s -s chat.lua http://127.0.0.1:PORT
wrk.method = "POST"
wrk.path = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["api-key"] = "x"
wrk.body = '{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello."}],"max_tokens":16}'
