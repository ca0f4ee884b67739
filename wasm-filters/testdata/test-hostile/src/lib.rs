//! `test-hostile`: a filter that misbehaves on purpose, for the host's limit and trap tests.
//!
//! The behaviour is chosen by `{"mode": "..."}` in the plugin configuration (or, for the
//! modes that act before `on_configure`, in the VM configuration; the plugin configuration is
//! also consulted there in case the host offers it early):
//!
//! | mode | where | what |
//! | --- | --- | --- |
//! | `loop` | `on_http_request_headers` | spins forever (the host must interrupt it: epoch/fuel) |
//! | `grow` | `on_http_request_headers` | allocates and touches 1 MiB chunks forever, keeping them (the host's memory limit must stop it; the allocation failure then traps) |
//! | `trap` | `on_http_request_headers` | panics (a Wasm trap: `unreachable`) |
//! | `response-trap` | `on_http_response_headers` | panics |
//! | `start-trap` | `on_vm_start` | panics |
//! | `configure-trap` | `on_configure` | panics |
//! | `configure-fail` | `on_configure` | returns `false` |
//! | anything else / none | | passes requests through, adding `x-hostile-mode: none` to responses |
//!
//! Each mode logs `test-hostile: <mode>` at `warn` right before misbehaving, through a raw
//! host call, so a test can tell the module got that far.

use std::hint::black_box;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel};

/// The misbehaviours.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    None,
    Loop,
    Grow,
    Trap,
    ResponseTrap,
    StartTrap,
    ConfigureTrap,
    ConfigureFail,
}

impl Mode {
    /// Reads `{"mode": "..."}`; anything unreadable is `None`.
    pub fn parse(config: Option<&[u8]>) -> Mode {
        let mode = config
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
            .and_then(|v| v.get("mode").and_then(|m| m.as_str()).map(str::to_string));
        match mode.as_deref() {
            Some("loop") => Mode::Loop,
            Some("grow") => Mode::Grow,
            Some("trap") => Mode::Trap,
            Some("response-trap") => Mode::ResponseTrap,
            Some("start-trap") => Mode::StartTrap,
            Some("configure-trap") => Mode::ConfigureTrap,
            Some("configure-fail") => Mode::ConfigureFail,
            _ => Mode::None,
        }
    }
}

impl Mode {
    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            Mode::None => "none",
            Mode::Loop => "loop",
            Mode::Grow => "grow",
            Mode::Trap => "trap",
            Mode::ResponseTrap => "response-trap",
            Mode::StartTrap => "start-trap",
            Mode::ConfigureTrap => "configure-trap",
            Mode::ConfigureFail => "configure-fail",
        }
    }
}

fn announce(mode: Mode) {
    let _ = hostcalls::log(LogLevel::Warn, &format!("test-hostile: {}", mode.name()));
}

/// Reads a configuration buffer without trusting the host to have one.
fn buffer(kind: BufferType) -> Option<Vec<u8>> {
    hostcalls::get_buffer(kind, 0, usize::MAX).ok().flatten()
}

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_| Box::new(HostileRoot { mode: Mode::None }));
}}

struct HostileRoot {
    mode: Mode,
}

impl Context for HostileRoot {}

impl RootContext for HostileRoot {
    fn on_vm_start(&mut self, _size: usize) -> bool {
        let vm = Mode::parse(buffer(BufferType::VmConfiguration).as_deref());
        let plugin = Mode::parse(buffer(BufferType::PluginConfiguration).as_deref());
        if vm == Mode::StartTrap || plugin == Mode::StartTrap {
            announce(Mode::StartTrap);
            panic!("test-hostile: start-trap");
        }
        true
    }

    fn on_configure(&mut self, _size: usize) -> bool {
        self.mode = Mode::parse(buffer(BufferType::PluginConfiguration).as_deref());
        match self.mode {
            Mode::ConfigureTrap => {
                announce(self.mode);
                panic!("test-hostile: configure-trap");
            }
            Mode::ConfigureFail => {
                announce(self.mode);
                false
            }
            _ => true,
        }
    }

    fn create_http_context(&self, _id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(HostileStream { mode: self.mode }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct HostileStream {
    mode: Mode,
}

impl Context for HostileStream {}

impl HttpContext for HostileStream {
    fn on_http_request_headers(&mut self, _n: usize, _eos: bool) -> Action {
        match self.mode {
            Mode::Loop => {
                announce(self.mode);
                spin()
            }
            Mode::Grow => {
                announce(self.mode);
                grow()
            }
            Mode::Trap => {
                announce(self.mode);
                panic!("test-hostile: trap");
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _n: usize, _eos: bool) -> Action {
        if self.mode == Mode::ResponseTrap {
            announce(self.mode);
            panic!("test-hostile: response-trap");
        }
        let _ = hostcalls::add_map_value(
            proxy_wasm::types::MapType::HttpResponseHeaders,
            "x-hostile-mode",
            "none",
        );
        Action::Continue
    }
}

/// Never returns; `black_box` keeps the optimizer from proving the loop useless.
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = black_box(n.wrapping_add(1));
    }
}

/// Never returns: keeps 1 MiB chunks, each page written so the memory is really used.
fn grow() -> ! {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; 1 << 20];
        for i in (0..chunk.len()).step_by(4096) {
            chunk[i] = 1;
        }
        hoard.push(black_box(chunk));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse() {
        assert_eq!(Mode::parse(Some(br#"{"mode": "loop"}"#)), Mode::Loop);
        assert_eq!(
            Mode::parse(Some(br#"{"mode": "start-trap"}"#)),
            Mode::StartTrap
        );
        assert_eq!(Mode::parse(Some(br#"{"mode": "nope"}"#)), Mode::None);
        assert_eq!(Mode::parse(Some(b"garbage")), Mode::None);
        assert_eq!(Mode::parse(None), Mode::None);
        for m in [
            Mode::Loop,
            Mode::Grow,
            Mode::Trap,
            Mode::ResponseTrap,
            Mode::StartTrap,
            Mode::ConfigureTrap,
            Mode::ConfigureFail,
        ] {
            let json = format!(r#"{{"mode": "{}"}}"#, m.name());
            assert_eq!(Mode::parse(Some(json.as_bytes())), m);
        }
    }
}
