// Preloaded with NODE_OPTIONS=--import: every request Node sends through undici (its fetch, and undici's
// own request(), which the conformance suite uses) carries the gateway's routing header. The suite's
// client knows nothing of AEnvCore-MCPProxy-URL; the gateway refuses a request without it.
import { Agent, setGlobalDispatcher } from "undici";

const name = process.env.ROUTE_HEADER ?? "AEnvCore-MCPProxy-URL";
const value = process.env.ROUTE_TO;

// undici passes headers as an object, a flat [name, value, ...] array, or an iterable of pairs.
function withRoute(headers) {
  if (headers == null) return { [name]: value };
  if (Array.isArray(headers)) {
    return headers.length && Array.isArray(headers[0]) ? [...headers, [name, value]] : [...headers, name, value];
  }
  if (typeof headers[Symbol.iterator] === "function") return [...headers, [name, value]];
  return { ...headers, [name]: value };
}

if (value) {
  setGlobalDispatcher(new Agent().compose((dispatch) => (options, handler) =>
    dispatch({ ...options, headers: withRoute(options.headers) }, handler)));
}
