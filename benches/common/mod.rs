//! What the benchmarks share: the bus under test, as given on the command line.

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A bus under test: `--bus NAME,PID,ADDRESS`.
#[derive(Clone)]
pub struct Bus {
    pub name: String,
    pub pid: u32,
    pub address: String,
}

impl std::str::FromStr for Bus {
    type Err = Box<dyn std::error::Error + Send + Sync>;

    fn from_str(spec: &str) -> Res<Bus> {
        let mut it = spec.splitn(3, ',');
        let (Some(name), Some(pid), Some(address)) = (it.next(), it.next(), it.next()) else {
            return Err(format!("bad --bus {spec:?}: want NAME,PID,ADDRESS").into());
        };
        Ok(Bus {
            name: name.to_string(),
            pid: pid.parse()?,
            address: address.to_string(),
        })
    }
}
