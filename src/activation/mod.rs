pub mod definition;
pub mod desktop;
pub mod exec;
