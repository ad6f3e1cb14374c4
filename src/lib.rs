//! busvisor: a D-Bus session bus that starts services on demand and
//! supervises them. See docs/ARCHITECTURE.md for the map of modules.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod driver;
pub mod matching;
pub mod names;
pub mod peer;
pub mod router;
pub mod transport;
pub mod activation;
