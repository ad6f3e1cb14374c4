//! The one JSON dialect of the control commands (docs/CLI.md, "JSON"):
//! snake_case keys, times in RFC 3339 (`null`: never), `null` for none,
//! and a `version` in every top-level object.

use serde_json::{Map, Value as Json, json};

use super::text::rfc3339;

/// The version of the JSON schema; it changes when a key changes meaning
/// or goes away (new keys may come without it).
pub const VERSION: u32 = 1;

/// A top-level object: `fields` plus the schema's version.
pub fn document(fields: Json) -> Json {
    let mut o = match fields {
        Json::Object(o) => o,
        other => {
            let mut o = Map::new();
            o.insert("value".into(), other);
            o
        }
    };
    o.insert("version".into(), json!(VERSION));
    Json::Object(o)
}

/// An error, as `--json` prints it on stdout.
pub fn error(message: &str) -> Json {
    document(json!({ "error": message }))
}

/// A D-Bus property name as a JSON key: `MainPID` → `main_pid`,
/// `PIDs` → `pids`, `IdleTimeout` → `idle_timeout_ms` (its unit).
pub fn key(property: &str) -> String {
    if property == "IdleTimeout" {
        return "idle_timeout_ms".to_owned();
    }
    let mut out = String::new();
    let mut prev_lower = false;
    for c in property.chars() {
        if c.is_ascii_uppercase() && prev_lower {
            out.push('_');
        }
        prev_lower = c.is_ascii_lowercase() || c.is_ascii_digit();
        out.push(c.to_ascii_lowercase());
    }
    out
}

/// A property's value in the dialect: times as RFC 3339, durations in ms,
/// and `null` for the API's "none" (0 pids, 0 times, empty strings, an
/// exit status of -1, a signal 0).
pub fn value(property: &str, v: &Json) -> Json {
    let u = v.as_u64();
    let none = match property {
        "MainPID" | "RequesterPID" | "LastExitPID" | "LastExitSignal" => u == Some(0),
        "StartTime" | "LastExitTime" | "NextRestartTime" | "LastFailureTime" | "IdleTimeout" => {
            u == Some(0)
        }
        "LastExitStatus" => v.as_i64() == Some(-1),
        "Requester" | "DefinitionError" | "LastFailure" | "ExecPath" => v.as_str() == Some(""),
        _ => false,
    };
    if none {
        return Json::Null;
    }
    match property {
        p if p.ends_with("Time") => u.map_or(Json::Null, |t| json!(rfc3339(t))),
        "IdleTimeout" => json!(u.unwrap_or(0) / 1000),
        _ => v.clone(),
    }
}

/// A service in the dialect, from its D-Bus properties (`GetAll`), plus
/// its object path.
pub fn service(props: &Map<String, Json>) -> Json {
    let mut o = Map::new();
    for (k, v) in props {
        o.insert(key(k), value(k, v));
    }
    if let Some(id) = props.get("Id").and_then(Json::as_str) {
        let path = crate::supervision::lifecycle::service_path(id);
        o.insert("path".into(), json!(path));
    }
    Json::Object(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_snake_case() {
        for (p, k) in [
            ("MainPID", "main_pid"),
            ("PIDs", "pids"),
            ("LastExitPID", "last_exit_pid"),
            ("RequesterPID", "requester_pid"),
            ("DefinitionFile", "definition_file"),
            ("StateChangeTime", "state_change_time"),
            ("IdleTimeout", "idle_timeout_ms"),
            ("Id", "id"),
        ] {
            assert_eq!(key(p), k);
        }
    }

    #[test]
    fn values_say_none_with_null() {
        assert_eq!(value("MainPID", &json!(0)), Json::Null);
        assert_eq!(value("MainPID", &json!(12)), json!(12));
        assert_eq!(value("LastExitStatus", &json!(-1)), Json::Null);
        assert_eq!(value("LastExitStatus", &json!(0)), json!(0));
        assert_eq!(value("StartTime", &json!(0)), Json::Null);
        assert_eq!(value("IdleTimeout", &json!(60_000_000)), json!(60_000));
        let t = value("StateChangeTime", &json!(1_738_324_801_234_567u64));
        assert!(t.as_str().unwrap().contains('T'), "{t}");
        assert_eq!(value("Requester", &json!("")), Json::Null);
        let d = document(json!({"a": 1}));
        assert_eq!(d["version"], VERSION);
    }
}
