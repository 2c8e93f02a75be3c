// The TypeScript SDK's client through the gateway: one tool call, then one refusal, printed as one JSON
// line for tests/test_ts_client.py. Usage: node ts_client.mjs GATEWAY_MCP_URL UPSTREAM_BASE_URL
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [gateway, upstream] = process.argv.slice(2);

async function connected(headers) {
  const client = new Client({ name: "aenv-gateway-ts-test", version: "1.0.0" });
  const transport = new StreamableHTTPClientTransport(new URL(gateway), { requestInit: { headers } });
  await client.connect(transport);
  return client;
}

const client = await connected({ "AEnvCore-MCPProxy-URL": upstream, "AEnvCore-EnvInstance-ID": "inst-ts" });
const tools = (await client.listTools()).tools.map((tool) => tool.name);
const added = await client.callTool({ name: "add", arguments: { a: 2, b: 3 } });
await client.close();

let refusal = null;
const started = performance.now();
try {
  await (await connected({ "AEnvCore-EnvInstance-ID": "inst-ts" })).close(); // no AEnvCore-MCPProxy-URL
} catch (error) {
  refusal = { name: error.constructor.name, code: error.code ?? null, message: error.message };
}
const refusalMs = performance.now() - started;

console.log(JSON.stringify({ tools, added: added.content.map((block) => block.text), refusal, refusalMs }));
