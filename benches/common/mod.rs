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

/// The bus the others are compared with: the last one given.
pub fn reference(buses: &[Bus]) -> usize {
    buses.len().saturating_sub(1)
}

/// Width of a column of bus names: the longest name, at least `min`.
pub fn name_width(buses: &[Bus], min: usize) -> usize {
    buses
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(0)
        .max(min)
}

/// A bench program's main: the parsed arguments, or exit 2 with the parse
/// error; then `run` on a 2-worker runtime, exit 1 if it fails.
pub fn main_with<A, F>(label: &str, args: Res<A>, run: impl FnOnce(A) -> F)
where
    F: std::future::Future<Output = Res<()>>,
{
    let args = args.unwrap_or_else(|e| {
        eprintln!("{label}: {e}");
        std::process::exit(2);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(e) = rt.block_on(run(args)) {
        eprintln!("{label}: {e}");
        std::process::exit(1);
    }
}
