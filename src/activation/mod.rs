//! What can be activated: service definitions (busvisor's TOML and
//! dbus-daemon's `[D-BUS Service]` files), the catalog they form, and the
//! directory watch that reloads it.

pub(crate) mod catalog;
pub(crate) mod definition;
pub(crate) mod desktop;
pub(crate) mod exec;
pub(crate) mod system;
pub(crate) mod watch;
