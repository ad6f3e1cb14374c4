//! docs/SERVICES.md's Rust service: a greeter on zbus, activated and
//! supervised by busvisor.
//!
//! `cargo build --release --example zbus_greeter`, then a definition
//! (`examples/services/rust-greeter.toml`) whose `exec` names the binary.

use std::future::pending;

use zbus::{connection, interface};

struct Greeter;

#[interface(name = "org.example.Greeter")]
impl Greeter {
    /// `Hello(s) -> s`, and a line in `busvisor logs`.
    fn hello(&self, who: &str) -> String {
        println!("greeting {who}");
        format!("Hello, {who}!")
    }

    /// `Pid() -> u`: this process.
    fn pid(&self) -> u32 {
        std::process::id()
    }
}

#[tokio::main]
async fn main() -> zbus::Result<()> {
    // The bus that started the service: busvisor sets DBUS_STARTER_ADDRESS
    // (and DBUS_SESSION_BUS_ADDRESS).
    let address = std::env::var("DBUS_STARTER_ADDRESS")
        .or_else(|_| std::env::var("DBUS_SESSION_BUS_ADDRESS"))
        .map_err(|_| zbus::Error::Address("no DBUS_STARTER_ADDRESS".into()))?;
    let name = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "org.example.RustGreeter".to_owned());
    // The object first, the name last: a message that activated the
    // service is delivered once the name is taken.
    let _conn = connection::Builder::address(address.as_str())
        .serve_at("/org/example/Greeter", Greeter)
        .name(name)
        .build()
        .await?;
    pending::<()>().await;
    Ok(())
}
