//! DNS serving shared by ztunnel's in-pod DNS proxy and the local mesh's cluster DNS: the UDP and
//! TCP loops, the checks every message goes through before anyone answers it ([`server`]), and
//! forwarding to upstream resolvers with hickory-resolver ([`forward`]).
//!
//! What answers a question is the caller's: an [`Answer`] fills in a response whose header,
//! question and EDNS are already set.

pub mod forward;
pub mod server;

pub use forward::{system_servers, ForwardError, Forwarded, Forwarder};
pub use server::{Answer, Limits, Server, Transport};
