-- wrk script for `make bench-fleet`: POST /mcp, each request to a target chosen at random.
--
-- Env: FLEET_TARGETS_FILE (one upstream base URL per line; the first FLEET_TARGETS are used),
-- FLEET_SKEW ("uniform", or "80/20": 80% of requests to the first fifth of the targets, the rest
-- spread over the other four fifths), FLEET_STATUS=1 to count responses by status and 503s that carry
-- Retry-After (that makes wrk parse every response in Lua, so it stays off in the speed cells).
-- Requests are formatted once per target in init: picking one per request is then a table lookup,
-- which keeps the load generator's own cost the same at 1 and at 4,000 targets.
-- done() prints one line "FLEETJSON {...}" (latency in microseconds).
local body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_documents",' ..
  '"arguments":{"query":"reverse proxy benchmark for MCP gateways","top_k":10},' ..
  '"_meta":{"progressToken":"fleet-0001"}}}'

local threads = {}
local requests = {}
local n, hot = 1, 1
local skewed = false
local count_status = os.getenv("FLEET_STATUS") == "1"
statuses = {}
retry_after = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  local limit = tonumber(os.getenv("FLEET_TARGETS") or "1")
  local path = os.getenv("FLEET_TARGETS_FILE") or error("FLEET_TARGETS_FILE is not set")
  local headers = {["Content-Type"] = "application/json", ["Accept"] = "application/json, text/event-stream"}
  n = 0
  for url in io.lines(path) do
    if n >= limit then break end
    n = n + 1
    headers["AEnvCore-MCPProxy-URL"] = url
    requests[n] = wrk.format("POST", "/mcp", headers, body)
  end
  hot = math.max(1, math.floor(n / 5))
  skewed = os.getenv("FLEET_SKEW") == "80/20" and n > hot
  math.randomseed(os.time())
end

function request()
  if skewed then
    if math.random() < 0.8 then
      return requests[math.random(1, hot)]
    end
    return requests[math.random(hot + 1, n)]
  end
  return requests[math.random(1, n)]
end

if count_status then
  function response(status, headers, body)
    statuses[status] = (statuses[status] or 0) + 1
    if status == 503 then
      for name, _ in pairs(headers) do
        if string.lower(name) == "retry-after" then
          retry_after = retry_after + 1
          break
        end
      end
    end
  end
end

function done(summary, latency, _)
  local merged, with_retry = {}, 0
  for _, thread in ipairs(threads) do
    for status, count in pairs(thread:get("statuses") or {}) do
      merged[status] = (merged[status] or 0) + count
    end
    with_retry = with_retry + (thread:get("retry_after") or 0)
  end
  local parts = {}
  for status, count in pairs(merged) do
    table.insert(parts, string.format('"%d":%d', status, count))
  end
  local e = summary.errors
  io.write(string.format(
    'FLEETJSON {"requests":%d,"duration_us":%d,"rps":%.2f,"p50_us":%.1f,"p99_us":%.1f,"max_us":%.1f,' ..
    '"err_connect":%d,"err_read":%d,"err_write":%d,"err_status":%d,"err_timeout":%d,' ..
    '"statuses":{%s},"retry_after_503":%d}\n',
    summary.requests, summary.duration, summary.requests / math.max(1, summary.duration) * 1e6,
    latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ","), with_retry))
end
