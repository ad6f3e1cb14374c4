//! D-Bus match rules and the index of them; see [`rule`].

mod rule;

pub use rule::*;
