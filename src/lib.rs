//! busvisor: a D-Bus session bus that starts services on demand and
//! supervises them. See docs/ARCHITECTURE.md for the map of modules.
//!
//! Two parts meet at one boundary: the message bus core (`bus`) and the
//! service manager (`supervision`, with `activation` and `lifecycle`). The
//! core sees the manager only through `bus::Activator`; `daemon` is the
//! composition root that joins them.

pub(crate) mod activation;
pub(crate) mod bus;
pub mod cli;
pub mod client;
pub(crate) mod config;
pub mod daemon;
pub(crate) mod lifecycle;
pub mod logging;
pub(crate) mod matching;
pub mod supervision;
pub(crate) mod transport;
pub(crate) mod wire;
