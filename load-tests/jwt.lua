-- load-tests/jwt.sh's requests: post.lua's chat body with `Authorization: Bearer TOKEN`, the
-- tokens read from $JWT_TOKENS (one a line; the first $JWT_COUNT of them) and used in turn.
local path = os.getenv("JWT_TOKENS")
local count = tonumber(os.getenv("JWT_COUNT") or "0")
local tokens = {}
for line in io.lines(path) do
  tokens[#tokens + 1] = line
  if count > 0 and #tokens >= count then break end
end
local body = '{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in five words."}],"max_tokens":32}'
local i = 0
request = function()
  i = i % #tokens + 1
  return wrk.format("POST", nil, {["content-type"] = "application/json", ["authorization"] = "Bearer " .. tokens[i]}, body)
end
