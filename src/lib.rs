//! busvisor: a D-Bus session bus that starts services on demand and
//! supervises them. See docs/ARCHITECTURE.md for the map of modules.

pub mod activation;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod daemon;
pub mod driver;
pub mod lifecycle;
pub mod logging;
pub mod matching;
pub mod names;
pub mod peer;
pub mod router;
pub mod supervision;
pub mod transport;
pub(crate) mod wire;
