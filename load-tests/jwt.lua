-- load-tests/jwt.sh's requests: post.lua's chat body with `Authorization: Bearer TOKEN`, the
-- tokens read from $JWT_TOKENS (one a line; the first $JWT_COUNT of them) and used in turn,
-- starting at the token after the first $JWT_START (default 0) so that successive wrk runs can
-- continue one cycle.
-- Every request is formatted once in init(), before wrk starts its clock: a request then costs
-- the load tool a table lookup whatever the number of tokens (formatting per request made a
-- new ~1 KiB Lua string per request with many tokens, an interned one with a single token).
local path = os.getenv("JWT_TOKENS")
local count = tonumber(os.getenv("JWT_COUNT") or "0")
local start = tonumber(os.getenv("JWT_START") or "0")
local body = '{"messages":[{"role":"system","content":"You are a helpful assistant."},{"role":"user","content":"Say hello in five words."}],"max_tokens":32}'
local requests = {}
local i = 0

function init(args)
  for line in io.lines(path) do
    requests[#requests + 1] = wrk.format("POST", nil,
      {["content-type"] = "application/json", ["authorization"] = "Bearer " .. line}, body)
    if count > 0 and #requests >= count then break end
  end
  i = start % #requests
end

request = function()
  i = i % #requests + 1
  return requests[i]
end
