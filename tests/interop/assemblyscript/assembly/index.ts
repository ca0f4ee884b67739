// A proxy-wasm HTTP filter written with @solo-io/proxy-runtime 0.1.8 (AssemblyScript, ABI 0.2.0),
// Ambit's own code, for the interop test wasm-host/tests/interop_assemblyscript.rs.
//
// Root id "ambit_as_interop":
//   - every request gets `x-as-seen: <its :path>`;
//   - a request for `/admin` (or below it) is answered locally with 403, a header and a body;
//   - every response gets `x-as-filter: <configuration>` (`hello` when the configuration is empty).
// Root id "ambit_as_stock": the SDK's own RootContext.onConfigure, unchanged (see below), and the
// same stream behaviour.
export * from "@solo-io/proxy-runtime/proxy";
import {
  RootContext,
  Context,
  registerRootContext,
  FilterHeadersStatusValues,
  GrpcStatusValues,
  stream_context,
  send_local_response,
  Headers,
  HeaderPair,
} from "@solo-io/proxy-runtime";
import { get_buffer_bytes, BufferTypeValues } from "@solo-io/proxy-runtime/runtime";

// The SDK's RootContext.onConfigure (0.1.8) calls
//   proxy_get_buffer_bytes(PluginConfiguration, 0, size, &buffer, size)
// i.e. it passes the configuration's *size* as the size out-pointer, so the host writes the size
// at guest address `size` (corrupting the module's static data when size > 0; address 0 when the
// configuration is empty). This root reads the configuration through the SDK's correct
// get_buffer_bytes helper instead.
class InteropRoot extends RootContext {
  config: string = "";

  onConfigure(configuration_size: u32): bool {
    this.config = String.UTF8.decode(
      get_buffer_bytes(BufferTypeValues.PluginConfiguration, 0, configuration_size));
    return true;
  }

  createContext(context_id: u32): Context {
    return new InteropFilter(context_id, this, this.config);
  }
}

// Keeps the SDK's onConfigure: only ever loaded with an empty configuration, where cpp-host
// (Envoy) writes the size 0 to guest address 0 and answers Ok.
class StockRoot extends RootContext {
  createContext(context_id: u32): Context {
    return new InteropFilter(context_id, this, this.getConfiguration());
  }
}

class InteropFilter extends Context {
  config: string;

  constructor(context_id: u32, root_context: RootContext, config: string) {
    super(context_id, root_context);
    this.config = config;
  }

  onRequestHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    const path = stream_context.headers.request.get(":path");
    stream_context.headers.request.add("x-as-seen", path);
    if (path == "/admin" || path.startsWith("/admin/")) {
      const headers: Headers = [];
      headers.push(new HeaderPair(String.UTF8.encode("x-as-denied"), String.UTF8.encode(path)));
      send_local_response(403, "as_filter_denied", String.UTF8.encode("denied by the AssemblyScript filter\n"),
        headers, <GrpcStatusValues>-1); // -1: not a gRPC answer
      return FilterHeadersStatusValues.StopIteration;
    }
    return FilterHeadersStatusValues.Continue;
  }

  onResponseHeaders(a: u32, end_of_stream: bool): FilterHeadersStatusValues {
    stream_context.headers.response.add("x-as-filter", this.config == "" ? "hello" : this.config);
    return FilterHeadersStatusValues.Continue;
  }
}

registerRootContext((context_id: u32) => {
  return new InteropRoot(context_id);
}, "ambit_as_interop");

registerRootContext((context_id: u32) => {
  return new StockRoot(context_id);
}, "ambit_as_stock");
