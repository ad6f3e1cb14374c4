//! D-Bus at the wire level: what the bus reads of a message's bytes itself, and the rules for the
//! names messages carry, both as dbus-daemon has them.
//!
//! * [`args`]: a body's top-level arguments and its signature as written.
//! * [`validate`]: bus names, interfaces, members, error names and object paths.

pub(crate) mod args;
pub(crate) mod validate;
