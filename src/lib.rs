//! busvisor: a D-Bus message bus (session or system) that starts services
//! on demand and supervises them. See docs/ARCHITECTURE.md for the map of modules.
//!
//! Two parts meet at one boundary: the message bus core (`bus`) and the
//! service manager (`supervision`, with the definitions of `activation`).
//! The core sees the manager only through `bus::Activator`; `daemon` is the
//! composition root that joins them; `wire` is the one door to zbus.

pub(crate) mod activation;
pub(crate) mod bus;
pub mod cli;
pub mod client;
pub(crate) mod config;
pub mod daemon;
pub(crate) mod forwarding;
#[doc(hidden)]
pub mod fuzzing;
pub mod generate;
pub mod keeper;
pub mod launch;
pub mod logging;
pub(crate) mod policy;
pub(crate) mod resident;
pub(crate) mod scheduling;
pub mod supervision;
pub(crate) mod transport;
pub(crate) mod warden;
pub(crate) mod wire;
