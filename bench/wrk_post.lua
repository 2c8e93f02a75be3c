-- wrk: POST /mcp with a ~300-byte JSON-RPC tools/call body; the routing header from env UPSTREAM_URL.
-- done() prints one line "WRKJSON {...}" (latencies in microseconds) that bench/run.py reads.
wrk.method = "POST"
wrk.path = "/mcp"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Accept"] = "application/json, text/event-stream"
wrk.headers["AEnvCore-MCPProxy-URL"] = os.getenv("UPSTREAM_URL") or "http://127.0.0.1:19800"
wrk.body = '{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"search_documents",' ..
  '"arguments":{"query":"reverse proxy benchmark for MCP gateways",' ..
  '"top_k":10,"filters":{"lang":"en","source":["docs","issues","code"],"min_score":0.25},' ..
  '"options":{"highlight":true}},"_meta":{"progressToken":"bench-0001"}}}'

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"rps":%.2f,"p50_us":%.1f,"p99_us":%.1f,"errors":%d}\n',
    summary.requests, summary.requests / (summary.duration / 1e6), latency:percentile(50),
    latency:percentile(99), e.connect + e.read + e.write + e.status + e.timeout))
end
