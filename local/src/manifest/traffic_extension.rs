//! `TrafficExtension` (`extensions.istio.io/v1alpha1`, Istio 1.30): WasmPlugin's successor.
//! Its targeting (`selector`, `targetRefs`, `phase`, `priority`, `match`) is WasmPlugin's, and
//! its `wasm:` holds WasmPlugin's module fields, so the Wasm form becomes a [`WasmPlugin`] with
//! the same meaning. The Lua form is refused: the waypoint runs proxy-wasm modules, not Lua.

use super::decode::{Node, Result};
use super::istio::{wasm_module, wasm_targeting, WasmPhase, WasmPluginSpec};

/// The proto's own enum names, beside WasmPlugin's that Istio's examples use.
const PHASES: [(&str, WasmPhase); 4] = [
    ("EXECUTION_PHASE_UNSPECIFIED", WasmPhase::Unspecified),
    ("EXECUTION_PHASE_AUTHN", WasmPhase::Authn),
    ("EXECUTION_PHASE_AUTHZ", WasmPhase::Authz),
    ("EXECUTION_PHASE_STATS", WasmPhase::Stats),
];

pub(super) fn traffic_extension_spec(node: &Node<'_>) -> Result<WasmPluginSpec> {
    let f = node.fields()?;
    let mut spec = wasm_targeting(&f, &PHASES)?;
    match (f.get("wasm"), f.get("lua")) {
        (Some(_), Some(_)) | (None, None) => {
            return Err(f.error_at("wasm", "exactly one of wasm or lua must be set"));
        }
        (None, Some(_)) => {
            return Err(f.error_at(
                "lua",
                "Lua extensions are not supported: Ambit's waypoint runs proxy-wasm modules \
                 only; use `wasm:` (a WasmPlugin's fields) instead",
            ));
        }
        (Some(wasm), None) => {
            let wf = wasm.fields()?;
            wasm_module(&wf, &mut spec)?;
            wf.finish()?;
        }
    }
    f.finish()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use crate::manifest::{parse, Kind, Object, WasmApi, WasmPhase};

    const TARGET: &str =
        "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]";

    fn wasm(text: &str) -> crate::manifest::WasmPlugin {
        match parse(text).unwrap_or_else(|e| panic!("{e}")).remove(0) {
            Object::WasmPlugin(p) => p,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_wasm_form_means_what_the_same_wasm_plugin_means() {
        let module = "url: file:///opt/filters/openid.wasm
    sha256: 1ef0c9a92b0420cf25f7fe5d481b231464bc88f486ca3b9c83ed5cc21d2f6210
    failStrategy: FAIL_OPEN
    pluginName: openid
    pluginConfig: {realm: ingress}
    vmConfig: {env: [{name: POD_NAME, valueFrom: HOST}]}
    type: HTTP";
        let extension = wasm(&format!(
            "apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {{name: oidc, namespace: demo}}
spec:
  {TARGET}
  phase: AUTHN
  priority: 10
  match: [{{mode: SERVER, ports: [{{number: 9080}}]}}]
  wasm:
    {module}
"
        ));
        let plugin = wasm(&format!(
            "apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {{name: oidc, namespace: demo}}
spec:
  {TARGET}
  phase: AUTHN
  priority: 10
  match: [{{mode: SERVER, ports: [{{number: 9080}}]}}]
  {}
",
            module.replace("\n    ", "\n  ")
        ));
        assert_eq!(extension.spec, plugin.spec);
        assert_eq!(extension.api, WasmApi::TrafficExtension);
        assert_eq!(extension.kind(), Kind::TrafficExtension);
        assert_eq!(
            Object::WasmPlugin(extension).object_ref().kind,
            Kind::TrafficExtension
        );
    }

    #[test]
    fn the_proto_phase_names_are_accepted() {
        let extension = wasm(&format!(
            "apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {{name: stats}}
spec:
  {TARGET}
  phase: EXECUTION_PHASE_STATS
  wasm: {{url: oci://ghcr.io/acme/stats:v1}}
"
        ));
        assert_eq!(extension.spec.phase, WasmPhase::Stats);
    }

    #[test]
    fn lua_and_malformed_extensions_are_refused_with_the_field() {
        let refused = |spec: &str| {
            parse(&format!(
                "apiVersion: extensions.istio.io/v1alpha1
kind: TrafficExtension
metadata: {{name: x}}
spec:
  {TARGET}
{spec}"
            ))
            .expect_err("refused")
            .to_string()
        };
        let lua = refused("  lua: {inlineCode: 'function envoy_on_request(h) end'}\n");
        assert!(lua.contains("spec.lua"), "{lua}");
        assert!(lua.contains("Lua extensions are not supported"), "{lua}");
        let both = refused("  lua: {inlineCode: x}\n  wasm: {url: oci://a/b}\n");
        assert!(both.contains("exactly one of wasm or lua"), "{both}");
        let neither = refused("  phase: AUTHN\n");
        assert!(neither.contains("exactly one of wasm or lua"), "{neither}");
        let unknown = refused("  wasm: {url: oci://a/b, sha: x}\n");
        assert!(unknown.contains("spec.wasm.sha"), "{unknown}");
        let url = refused("  wasm: {pluginName: x}\n");
        assert!(url.contains("spec.wasm.url"), "{url}");
    }
}
