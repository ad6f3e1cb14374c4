//! The supervisor's signals as `busvisor events` prints them: decoded into
//! [`Event`]s, then one JSON object or one line of aligned columns each.

use std::time::Duration;

use super::{Message, Structure};
use serde_json::{Map, Value as Json, json};

use super::text::{Output, format_duration, format_time, rfc3339, signal_name};
use super::{json, json_plain, variant_to_json};

/// The widest event name (`activation-requested`): the event column's width.
const EVENT_WIDTH: usize = 20;

/// A decoded signal of the manager.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Event serial; `None` for `LogLine`.
    pub serial: Option<u64>,
    pub id: String,
    /// The signal name in kebab case: `activation-requested`, `ready`, ...,
    /// `log` for `LogLine`.
    pub kind: String,
    /// The other arguments, named as in docs/API.md.
    pub fields: Vec<(&'static str, Json)>,
}

impl Event {
    pub fn from_message(m: &Message) -> Option<Event> {
        let h = m.header();
        let member = h.member()?.as_str().to_owned();
        drop(h);
        let b = m.body();
        let ev = |serial, id, fields| Event {
            serial: Some(serial),
            id,
            kind: kebab(&member),
            fields,
        };
        let typed = match member.as_str() {
            "ActivationRequested" => {
                b.deserialize::<(u64, String, String, u32)>()
                    .ok()
                    .map(|(s, id, r, p)| {
                        ev(
                            s,
                            id,
                            vec![("requester", json!(r)), ("requester_pid", json!(p))],
                        )
                    })
            }
            "Started" => b
                .deserialize::<(u64, String, u32)>()
                .ok()
                .map(|(s, id, p)| ev(s, id, vec![("pid", json!(p))])),
            "Ready" => b
                .deserialize::<(u64, String, u32)>()
                .ok()
                .map(|(s, id, p)| ev(s, id, vec![("main_pid", json!(p))])),
            "Exited" => b
                .deserialize::<(u64, String, u32, String, i32, bool)>()
                .ok()
                .map(|(s, id, pid, how, st, fail)| {
                    ev(
                        s,
                        id,
                        vec![
                            ("pid", json!(pid)),
                            ("how", json!(how)),
                            ("status", json!(st)),
                            ("failure", json!(fail)),
                        ],
                    )
                }),
            "Restarting" => {
                b.deserialize::<(u64, String, u32, u64)>()
                    .ok()
                    .map(|(s, id, att, d)| {
                        ev(s, id, vec![("attempt", json!(att)), ("delay_ms", json!(d))])
                    })
            }
            "Failed" => b
                .deserialize::<(u64, String, String)>()
                .ok()
                .map(|(s, id, r)| ev(s, id, vec![("reason", json!(r))])),
            "Stopping" | "Stopped" | "IdleStopped" => b
                .deserialize::<(u64, String)>()
                .ok()
                .map(|(s, id)| ev(s, id, vec![])),
            "LogLine" => b
                .deserialize::<(String, u32, String, String, u64)>()
                .ok()
                .map(|(id, pid, line, stream, _)| Event {
                    serial: None,
                    id,
                    kind: "log".to_owned(),
                    fields: vec![
                        ("pid", json!(pid)),
                        ("stream", json!(stream)),
                        ("line", json!(line)),
                    ],
                }),
            _ => None,
        };
        if typed.is_some() {
            return typed;
        }
        // An unknown signal, or a known one with an unexpected signature:
        // show what it carries.
        let args: Vec<Json> = match b.deserialize::<Structure<'_>>() {
            Ok(s) => s.fields().iter().map(variant_to_json).collect(),
            Err(_) => vec![],
        };
        let serial = args.first().and_then(Json::as_u64);
        let id = args
            .get(1)
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned();
        Some(Event {
            serial,
            id,
            kind: kebab(&member),
            fields: vec![
                ("signature", json!(b.signature().to_string())),
                ("args", Json::Array(args)),
            ],
        })
    }

    fn field(&self, k: &str) -> Option<&Json> {
        self.fields.iter().find(|(n, _)| *n == k).map(|(_, v)| v)
    }

    /// One JSON object: time, serial, id, event, then the arguments.
    pub fn to_json(&self, now_us: u64) -> Json {
        let mut o = Map::new();
        o.insert("time".into(), json!(rfc3339(now_us)));
        o.insert("serial".into(), json!(self.serial));
        o.insert("id".into(), json!(self.id));
        o.insert("event".into(), json!(self.kind));
        for (k, v) in &self.fields {
            o.insert((*k).into(), v.clone());
        }
        json::document(Json::Object(o))
    }

    /// `2025-01-31 12:00:01.234 CET  #42    echo  ready  main_pid=1234`:
    /// columns padded to `widths` (serial, id), which grow when a wider
    /// value comes.
    pub fn human(&self, now_us: u64, out: &Output, widths: &mut Widths) -> String {
        let serial = match self.serial {
            Some(s) => format!("#{s}"),
            None => "-".to_owned(),
        };
        let failure = self.field("failure").and_then(Json::as_bool) == Some(true);
        let color_key = if self.kind == "exited" && failure {
            "exited-failure"
        } else {
            self.kind.as_str()
        };
        widths.serial = widths.serial.max(serial.len());
        widths.id = widths.id.max(self.id.chars().count());
        let kind = format!("{:<EVENT_WIDTH$}", self.kind);
        let mut s = format!(
            "{}  {serial:<sw$}  {:<iw$}  {}",
            format_time(now_us),
            self.id,
            out.paint(&kind, color_key),
            sw = widths.serial,
            iw = widths.id,
        );
        let details = self.details();
        if details.is_empty() {
            return s.trim_end().to_owned();
        }
        s.push_str("  ");
        s.push_str(&details);
        s
    }

    /// The arguments as `key=value` words.
    pub fn details(&self) -> String {
        let get = |k| self.field(k).cloned().unwrap_or(Json::Null);
        match self.kind.as_str() {
            "activation-requested" => {
                let r = get("requester");
                if r.as_str() == Some("") {
                    "requester=none (explicit start)".to_owned()
                } else {
                    format!(
                        "requester={} requester_pid={}",
                        json_plain(&r),
                        json_plain(&get("requester_pid"))
                    )
                }
            }
            "exited" => {
                let how = get("how");
                let status = get("status");
                let what = if how.as_str() == Some("killed") {
                    format!("signal={}", signal_name(status.as_i64().unwrap_or(0)))
                } else {
                    format!("status={}", json_plain(&status))
                };
                format!(
                    "pid={} {what} failure={}",
                    json_plain(&get("pid")),
                    json_plain(&get("failure"))
                )
            }
            "restarting" => format!(
                "attempt={} delay={}",
                json_plain(&get("attempt")),
                format_duration(Duration::from_millis(get("delay_ms").as_u64().unwrap_or(0)))
            ),
            "log" => format!(
                "pid={} {}  {}",
                json_plain(&get("pid")),
                json_plain(&get("stream")),
                json_plain(&get("line"))
            ),
            _ => self
                .fields
                .iter()
                .map(|(k, v)| {
                    let t = json_plain(v);
                    if t.is_empty() || t.contains(char::is_whitespace) {
                        format!("{k}={v}")
                    } else {
                        format!("{k}={t}")
                    }
                })
                .collect::<Vec<_>>()
                .join(" "),
        }
    }
}

/// The widths of the variable columns of `events`' lines.
#[derive(Debug, Clone, Copy)]
pub struct Widths {
    pub serial: usize,
    pub id: usize,
}

/// `ActivationRequested` → `activation-requested`.
pub fn kebab(s: &str) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('-');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kebab_case() {
        assert_eq!(kebab("ActivationRequested"), "activation-requested");
        assert_eq!(kebab("IdleStopped"), "idle-stopped");
        assert_eq!(kebab("Ready"), "ready");
    }

    #[test]
    fn event_lines_are_aligned() {
        let out = Output::plain();
        let mut w = Widths { serial: 3, id: 4 };
        let e = Event {
            serial: Some(42),
            id: "org.busvisor.Example.Echo".into(),
            kind: "ready".into(),
            fields: vec![("main_pid", json!(1234))],
        };
        let line = e.human(0, &out, &mut w);
        let want = format!(
            "  #42  org.busvisor.Example.Echo  ready{}  main_pid=1234",
            " ".repeat(EVENT_WIDTH - 5)
        );
        assert!(line.ends_with(&want), "{line:?}");
        let short = Event {
            id: "x".into(),
            ..e.clone()
        };
        let line2 = short.human(0, &out, &mut w);
        assert_eq!(line.find("ready"), line2.find("ready"), "{line}\n{line2}");
        let e = Event {
            serial: Some(7),
            id: "x".into(),
            kind: "exited".into(),
            fields: vec![
                ("pid", json!(5)),
                ("how", json!("killed")),
                ("status", json!(9)),
                ("failure", json!(true)),
            ],
        };
        assert_eq!(e.details(), "pid=5 signal=SIGKILL failure=true");
        let j = e.to_json(0);
        assert_eq!(j["serial"], 7);
        assert_eq!(j["event"], "exited");
        assert_eq!(j["how"], "killed");
        assert_eq!(j["version"], json::VERSION);
    }
}
