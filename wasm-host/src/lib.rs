//! Ambit's proxy-wasm host: runs filters written for Envoy and Istio (proxy-wasm ABI 0.2.0 and
//! 0.2.1) on wasmtime, for the waypoint and for the filter test harness.
//!
//! The embedding follows wasmtime's model: one [`Runtime`] (one `Engine` with a pooling allocator
//! and copy-on-write memory images, one `Linker` with every host function), a [`Plugin`] per
//! loaded module (its `InstancePre` and a small pool of VMs), and per request an [`HttpStream`]
//! (one plugin) or a [`FilterChain`] (several). Every guest pointer is bounds-checked; memory,
//! CPU per callback, buffered bodies and host-call buffers are limited; a trap or a breached limit
//! fails only the requests on that VM, per the plugin's [`FailStrategy`], and the VM is replaced.

pub mod abi;
pub mod chain;
pub mod context;
mod host;
pub mod http_call;
pub mod metrics;
pub mod plugin;
mod properties;
pub mod runtime;
mod shared;
pub mod stream;
#[cfg(feature = "testing")]
pub mod testing;
mod vm;

pub use abi::{AbiVersion, LogLevel, Pairs};
pub use chain::FilterChain;
pub use context::{LocalResponse, StreamInfo};
pub use http_call::{HttpCallRequest, HttpCallResponse, HttpCaller};
pub use plugin::{FailStrategy, Plugin, PluginConfig, PluginError, PluginHooks};
pub use runtime::{Limits, Runtime, RuntimeConfig};
pub use stream::{BodyStep, HttpStream, Step};
pub use vm::VmFailure;
