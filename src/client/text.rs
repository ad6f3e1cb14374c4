//! What the control commands print for people: stdout flushed line by
//! line, colour only on a terminal, columns that fit its width, and times
//! with their date and time zone (jiff reads the system's zone database).

use std::io::{self, IsTerminal, Write};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jiff::Timestamp;
use jiff::tz::TimeZone;

use super::{Failure, Result};

/// stdout, flushed after every line, with colour only on a terminal.
pub struct Output {
    out: io::Stdout,
    pub color: bool,
    /// The terminal's width, when stdout is one.
    pub width: Option<usize>,
}

impl Output {
    pub fn stdout() -> Output {
        let out = io::stdout();
        let tty = out.is_terminal();
        let color = tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
        let width = tty
            .then(|| terminal_size::terminal_size_of(&out))
            .flatten()
            .map(|(w, _)| w.0 as usize);
        Output { out, color, width }
    }

    /// No colour, no width: what tests compare.
    #[cfg(test)]
    pub fn plain() -> Output {
        Output {
            out: io::stdout(),
            color: false,
            width: None,
        }
    }

    /// Write `s` plus a newline, and flush.
    pub fn line(&mut self, s: &str) -> Result<()> {
        let mut o = self.out.lock();
        o.write_all(s.as_bytes())?;
        o.write_all(b"\n")?;
        o.flush()?;
        Ok(())
    }

    pub fn json(&mut self, v: &serde_json::Value) -> Result<()> {
        self.line(&v.to_string())
    }

    pub fn json_pretty(&mut self, v: &serde_json::Value) -> Result<()> {
        let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
        self.line(&s)
    }

    /// `text` in the colour for `state` (a service state or an event).
    pub fn paint(&self, text: &str, state: &str) -> String {
        if !self.color {
            return text.to_owned();
        }
        let code = match state {
            "running" | "ready" | "started" => "32",
            "activating" | "restarting" | "stopping" | "activation-requested" => "33",
            "failed" | "bad-definition" | "exited-failure" | "stderr" => "1;31",
            "exited" => "33",
            "inactive" | "stopped" | "idle-stopped" | "disabled" => "2",
            _ => return text.to_owned(),
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    }
}

/// Left-align `rows` into columns two spaces apart. With `width`, the
/// columns from `shrink` on are cut (ending in `…`) so that each line fits;
/// `paint` colours a cell's text after padding is computed from the plain
/// text.
pub fn table(
    rows: &[Vec<String>],
    width: Option<usize>,
    shrink: usize,
    paint: impl Fn(usize, usize, &str) -> String,
) -> Vec<String> {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let mut w = vec![0; cols];
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    if let Some(max) = width {
        fit(&mut w, max, shrink);
    }
    rows.iter()
        .enumerate()
        .map(|(ri, r)| {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                let cell = cut(c, w[i]);
                line.push_str(&paint(ri, i, &cell));
                if i + 1 < r.len() {
                    let pad = w[i] - cell.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line.trim_end().to_owned()
        })
        .collect()
}

/// Narrow the columns from `shrink` on, the widest first, until the line
/// (columns two spaces apart) fits `max`; none narrower than 8 (or its
/// content).
fn fit(w: &mut [usize], max: usize, shrink: usize) {
    let total = |w: &[usize]| w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1);
    while total(w) > max {
        let Some((i, _)) = w
            .iter()
            .enumerate()
            .skip(shrink)
            .filter(|(_, c)| **c > 8)
            .max_by_key(|(_, c)| **c)
        else {
            return;
        };
        w[i] -= 1;
    }
}

/// `s` cut to `n` characters, the last one `…` when cut.
pub fn cut(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(n.saturating_sub(1)).collect();
    out.push('…');
    out
}

// ---------------------------------------------------------------- time

pub fn now_us() -> u64 {
    us_of(SystemTime::now())
}

pub fn us_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// `us` µs since the epoch in the local time zone (the system's, or
/// `TZ`'s).
fn zoned(us: u64) -> jiff::Zoned {
    let ts = Timestamp::from_microsecond(us as i64).unwrap_or(Timestamp::UNIX_EPOCH);
    ts.to_zoned(TimeZone::system())
}

/// `2025-01-31 12:00:01.234 CET`: local time, milliseconds, time zone.
pub fn format_time(us: u64) -> String {
    zoned(us).strftime("%Y-%m-%d %H:%M:%S%.3f %Z").to_string()
}

/// `Fri 2025-01-31 12:00:01 CET`, as systemctl writes a time.
pub fn format_day_time(us: u64) -> String {
    zoned(us).strftime("%a %Y-%m-%d %H:%M:%S %Z").to_string()
}

/// RFC 3339 with microseconds and the local offset:
/// `2025-01-31T12:00:01.234567+01:00`.
pub fn rfc3339(us: u64) -> String {
    zoned(us).strftime("%Y-%m-%dT%H:%M:%S%.6f%:z").to_string()
}

/// When `--since TIME` begins, in µs since the epoch: `now`, `today`,
/// `yesterday`, a date (`2025-01-31`), a date and time (`2025-01-31 12:00`,
/// `2025-01-31T12:00:00`), a time today (`12:00`, `12:00:30`), RFC 3339
/// (`2025-01-31T12:00:00+01:00`), or a duration ago (`10min`, `-1h`,
/// `90s ago`).
pub fn parse_since(text: &str, now_us: u64) -> Result<u64, String> {
    let t = text.trim();
    let tz = TimeZone::system();
    let now = zoned(now_us);
    let bad = || {
        format!(
            "--since {text:?}: not a time (try `2025-01-31 12:00`, `12:00`, `today`, `yesterday`, `10min` or `1h ago`)"
        )
    };
    let midnight = |days_back: i64| -> Result<u64, String> {
        let day = now.date().checked_sub(jiff::Span::new().days(days_back));
        let z = day
            .and_then(|d| d.to_zoned(tz.clone()))
            .map_err(|e| e.to_string())?;
        Ok(z.timestamp().as_microsecond().max(0) as u64)
    };
    match t {
        "now" => return Ok(now_us),
        "today" => return midnight(0),
        "yesterday" => return midnight(1),
        _ => {}
    }
    let ago = t
        .strip_suffix("ago")
        .map(str::trim_end)
        .or_else(|| t.strip_prefix('-'));
    if let Some(d) = ago {
        let d = crate::activation::definition::parse_duration(d.trim()).map_err(|_| bad())?;
        return Ok(now_us.saturating_sub(d.as_micros() as u64));
    }
    let us = |ts: Timestamp| ts.as_microsecond().max(0) as u64;
    if let Ok(ts) = t.parse::<Timestamp>() {
        return Ok(us(ts));
    }
    if let Ok(dt) = t.parse::<jiff::civil::DateTime>() {
        let z = dt.to_zoned(tz).map_err(|e| e.to_string())?;
        return Ok(us(z.timestamp()));
    }
    if let Ok(time) = t.parse::<jiff::civil::Time>() {
        let z = now
            .date()
            .to_datetime(time)
            .to_zoned(tz)
            .map_err(|e| e.to_string())?;
        return Ok(us(z.timestamp()));
    }
    if let Ok(d) = crate::activation::definition::parse_duration(t) {
        return Ok(now_us.saturating_sub(d.as_micros() as u64));
    }
    Err(bad())
}

/// `3s ago`, `in 2s`, `just now`.
pub fn relative_time(us: u64, now_us: u64) -> String {
    if us <= now_us {
        let d = Duration::from_micros(now_us - us);
        if d < Duration::from_millis(1) {
            "just now".to_owned()
        } else {
            format!("{} ago", format_duration_coarse(d))
        }
    } else {
        format!(
            "in {}",
            format_duration_coarse(Duration::from_micros(us - now_us))
        )
    }
}

/// Two significant units: `250ms`, `3s`, `1min 5s`, `2h 3min`, `4d 1h`.
pub fn format_duration_coarse(d: Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return format!("{}ms", d.as_millis());
    }
    if s < 60 {
        return format!("{s}s");
    }
    let two = |big: u64, bu: &str, small: u64, su: &str| {
        if small == 0 {
            format!("{big}{bu}")
        } else {
            format!("{big}{bu} {small}{su}")
        }
    };
    let (m, s) = (s / 60, s % 60);
    if m < 60 {
        return two(m, "min", s, "s");
    }
    let (h, m) = (m / 60, m % 60);
    if h < 24 {
        return two(h, "h", m, "min");
    }
    two(h / 24, "d", h % 24, "h")
}

/// An exact duration: `250ms`, `1.5s`, `60s`, `1min 30s`.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1000 {
        if !d.subsec_micros().is_multiple_of(1000) && ms < 10 {
            return format!("{}us", d.as_micros());
        }
        return format!("{ms}ms");
    }
    if d.as_secs() < 60 {
        return if ms.is_multiple_of(1000) {
            format!("{}s", ms / 1000)
        } else {
            format!("{}s", (ms as f64) / 1000.0)
        };
    }
    format_duration_coarse(d)
}

/// "exited with status 3", "killed by SIGKILL", ...
pub fn exit_text(status: i64, signal: i64) -> String {
    if signal != 0 {
        format!("killed by {}", signal_name(signal))
    } else if status == 0 {
        "exited successfully".to_owned()
    } else {
        format!("exited with status {status}")
    }
}

pub fn signal_name(n: i64) -> String {
    i32::try_from(n)
        .ok()
        .and_then(|n| nix::sys::signal::Signal::try_from(n).ok())
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|| format!("signal {n}"))
}

/// A process's command line, as `ps` shows it (None: gone, or unreadable).
pub fn command_line(pid: u32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let words: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|w| !w.is_empty())
        .map(|w| String::from_utf8_lossy(w).into_owned())
        .collect();
    if words.is_empty() {
        // A kernel thread, or a zombie: its name.
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        return Some(format!("[{}]", comm.trim_end()));
    }
    Some(words.join(" "))
}

impl From<String> for Failure {
    fn from(s: String) -> Failure {
        Failure::msg(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_secs(60)), "1min");
        assert_eq!(format_duration(Duration::from_secs(90)), "1min 30s");
        assert_eq!(format_duration_coarse(Duration::from_secs(3)), "3s");
        assert_eq!(format_duration_coarse(Duration::from_secs(7300)), "2h 1min");
        assert_eq!(format_duration_coarse(Duration::from_secs(90000)), "1d 1h");
        assert_eq!(relative_time(1_000_000, 4_500_000), "3s ago");
        assert_eq!(relative_time(4_000_000, 2_000_000), "in 2s");
    }

    #[test]
    fn exit_texts() {
        assert_eq!(exit_text(3, 0), "exited with status 3");
        assert_eq!(exit_text(0, 0), "exited successfully");
        assert_eq!(exit_text(-1, 9), "killed by SIGKILL");
        assert_eq!(signal_name(15), "SIGTERM");
    }

    #[test]
    fn aligned_table_fits_the_width() {
        let rows = vec![
            vec!["A".to_owned(), "bb".to_owned(), "c".to_owned()],
            vec!["aaa".to_owned(), "b".to_owned(), "".to_owned()],
        ];
        let t = table(&rows, None, 0, |_, _, s| s.to_owned());
        assert_eq!(t, vec!["A    bb  c", "aaa  b"]);
        let rows = vec![vec!["id".to_owned(), "x".repeat(30), "y".repeat(40)]];
        let t = table(&rows, Some(40), 1, |_, _, s| s.to_owned());
        assert!(t[0].chars().count() <= 40, "{t:?}");
        assert!(t[0].ends_with('…'), "{t:?}");
        assert!(t[0].starts_with("id  "), "{t:?}");
    }

    #[test]
    fn times_carry_date_and_zone() {
        // 2025-01-31T12:00:01.234567Z, whatever the local zone.
        let us = 1_738_324_801_234_567;
        let iso = rfc3339(us);
        let back: Timestamp = iso.parse().unwrap();
        assert_eq!(back.as_microsecond() as u64, us, "{iso}");
        assert!(iso.contains('T') && iso.len() == "2025-01-31T12:00:01.234567+00:00".len());
        let text = format_time(us);
        assert!(text.contains(":01.234 "), "{text}");
        assert!(text.starts_with("2025-01-3") || text.starts_with("2025-02-0"));
    }

    #[test]
    fn since_forms() {
        let now = 1_738_324_801_000_000;
        assert_eq!(parse_since("now", now), Ok(now));
        assert_eq!(parse_since("10min", now), Ok(now - 600_000_000));
        assert_eq!(parse_since("-1h", now), Ok(now - 3_600_000_000));
        assert_eq!(parse_since("90s ago", now), Ok(now - 90_000_000));
        assert_eq!(
            parse_since("2025-01-31T12:00:01Z", now),
            Ok(1_738_324_801_000_000)
        );
        let today = parse_since("today", now).unwrap();
        let yesterday = parse_since("yesterday", now).unwrap();
        assert!(today <= now && now - today < 86_400_000_000 + 3_600_000_000);
        assert!(today - yesterday >= 82_800_000_000);
        let local = parse_since("2025-01-31 12:00", now).unwrap();
        assert!(local.abs_diff(now) < 86_400_000_000);
        assert!(parse_since("12:00", now).is_ok());
        assert!(parse_since("soon", now).is_err());
    }
}
