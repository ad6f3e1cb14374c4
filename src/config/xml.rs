//! dbus-daemon's XML configuration format (the `busconfig` DTD), as
//! documented in dbus-daemon(1) and implemented by bus/config-parser.c.
//!
//! Semantics follow dbus-daemon 1.14:
//!
//! * included files are processed in place, so later settings override
//!   earlier ones (`<type>`, `<pidfile>`, `<user>`, `<limit>`) and lists
//!   (`<listen>`, `<auth>`, `<servicedir>`, policies) are appended to;
//! * a file in an `<includedir>` that fails to load is skipped with a
//!   warning, without affecting the configuration (dbus-daemon logs and
//!   ignores such errors); any other error is fatal;
//! * `<include if_selinux_enabled="yes">` is skipped (busvisor has no
//!   SELinux support);
//! * unknown elements, misplaced elements, unknown attributes, bad
//!   attribute values and unknown `<limit>` names are errors, as in
//!   dbus-daemon;
//! * `<policy>`, `<allow>` and `<deny>` become the rules of
//!   [`BusConfig::policy_rules`] (`crate::policy::parse`); an unknown user or
//!   group drops its policy or rule with a warning, as in dbus-daemon.

use std::path::{Path, PathBuf};

use quick_xml::Reader;
use quick_xml::events::{BytesStart, Event};

use super::{
    BusConfig, ConfigError, LimitSet, ServiceDir, address, process_env,
    standard_session_servicedirs, standard_system_servicedirs,
};
use crate::policy::parse::{self, Parsed, PolicyContext, SystemAccounts};

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Load an XML configuration file (and everything it includes), using the
/// process environment for `<standard_session_servicedirs/>`.
pub fn load_xml(path: &Path) -> Result<BusConfig, ConfigError> {
    load_xml_with_env(path, &process_env)
}

/// [`load_xml`] with an explicit environment.
pub fn load_xml_with_env(path: &Path, env: Env<'_>) -> Result<BusConfig, ConfigError> {
    let mut st = State::new(env);
    st.include_file(path, false, path, None)?;
    Ok(st.finish())
}

/// [`parse_xml`] with an explicit environment.
pub fn parse_xml_with_env(
    text: &str,
    origin: &Path,
    env: Env<'_>,
) -> Result<BusConfig, ConfigError> {
    let mut st = State::new(env);
    st.include_stack.push(canonical(origin));
    st.parse_text(text, origin)?;
    st.include_stack.pop();
    Ok(st.finish())
}

/// busvisor's own rules on a system bus: the control API for root, the
/// services' output for root only (see the file).
const SUPERVISOR_SYSTEM_POLICY: &str = include_str!("supervisor-system-policy.conf");

fn supervisor_system_policy() -> crate::policy::Policy {
    let origin = Path::new("<built-in org.busvisor.Supervisor1 system policy>");
    let mut st = State::new(&super::process_env);
    st.parse_text(SUPERVISOR_SYSTEM_POLICY, origin)
        .expect("the built-in policy parses (tested)");
    st.acc.cfg.policy_rules
}

/// Bound on `<include>` nesting (distinct files; loops are caught
/// separately), so that hostile configurations cannot exhaust the stack.
const MAX_INCLUDE_DEPTH: usize = 64;

fn canonical(p: &Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn resolve(base_dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

fn line_of(text: &str, pos: usize) -> u64 {
    let end = pos.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count() as u64
        + 1
}

/// Everything an include may change; cloned to roll back a failed file in
/// an `<includedir>`.
#[derive(Debug, Clone)]
struct Accum {
    cfg: BusConfig,
}

struct State<'e> {
    env: Env<'e>,
    acc: Accum,
    /// Files being parsed (canonical paths), for include-loop detection.
    include_stack: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Busconfig,
    Type,
    Listen,
    Auth,
    Servicedir,
    StandardSession,
    StandardSystem,
    Limit,
    Include,
    Includedir,
    Policy,
    Allow,
    Deny,
    Fork,
    KeepUmask,
    Syslog,
    Pidfile,
    User,
    Servicehelper,
    AllowAnonymous,
    Apparmor,
    Selinux,
    Associate,
}

impl Kind {
    fn from_name(name: &str) -> Option<Kind> {
        Some(match name {
            "busconfig" => Kind::Busconfig,
            "type" => Kind::Type,
            "listen" => Kind::Listen,
            "auth" => Kind::Auth,
            "servicedir" => Kind::Servicedir,
            "standard_session_servicedirs" => Kind::StandardSession,
            "standard_system_servicedirs" => Kind::StandardSystem,
            "limit" => Kind::Limit,
            "include" => Kind::Include,
            "includedir" => Kind::Includedir,
            "policy" => Kind::Policy,
            "allow" => Kind::Allow,
            "deny" => Kind::Deny,
            "fork" => Kind::Fork,
            "keep_umask" => Kind::KeepUmask,
            "syslog" => Kind::Syslog,
            "pidfile" => Kind::Pidfile,
            "user" => Kind::User,
            "servicehelper" => Kind::Servicehelper,
            "allow_anonymous" => Kind::AllowAnonymous,
            "apparmor" => Kind::Apparmor,
            "selinux" => Kind::Selinux,
            "associate" => Kind::Associate,
            _ => return None,
        })
    }

    /// Elements whose text content is their value (dbus-daemon requires it
    /// to be non-empty).
    fn has_content(self) -> bool {
        matches!(
            self,
            Kind::Type
                | Kind::Listen
                | Kind::Auth
                | Kind::Servicedir
                | Kind::Limit
                | Kind::Include
                | Kind::Includedir
                | Kind::Pidfile
                | Kind::User
                | Kind::Servicehelper
        )
    }

    fn allowed_parent(self) -> Option<Kind> {
        match self {
            Kind::Busconfig => None,
            Kind::Allow | Kind::Deny => Some(Kind::Policy),
            Kind::Associate => Some(Kind::Selinux),
            _ => Some(Kind::Busconfig),
        }
    }

    fn allowed_attributes(self) -> &'static [&'static str] {
        match self {
            Kind::Limit => &["name"],
            Kind::Include => &[
                "ignore_missing",
                "if_selinux_enabled",
                "selinux_root_relative",
            ],
            Kind::Policy => parse::POLICY_ATTRIBUTES,
            Kind::Allow | Kind::Deny => parse::RULE_ATTRIBUTES,
            Kind::Apparmor => &["mode"],
            Kind::Associate => &["own", "context"],
            _ => &[],
        }
    }
}

/// The policy an `<allow>`/`<deny>` belongs to.
#[derive(Debug, Clone)]
struct PolicyCtx {
    /// Where its rules go; `None` for a policy of an unknown user or group,
    /// whose rules are checked and dropped.
    context: Option<PolicyContext>,
}

struct Frame {
    kind: Kind,
    name: String,
    attrs: Vec<(String, String)>,
    content: String,
    line: u64,
    policy: Option<PolicyCtx>,
}

impl Frame {
    fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn tag(&self) -> String {
        let mut s = format!("<{}", self.name);
        for (k, v) in &self.attrs {
            s.push_str(&format!(" {k}=\"{v}\""));
        }
        s.push_str(if self.kind == Kind::Policy { ">" } else { "/>" });
        s
    }
}

/// Per-file parsing context.
struct FileCtx<'t> {
    path: &'t Path,
    base_dir: PathBuf,
    text: &'t str,
}

impl FileCtx<'_> {
    fn invalid(&self, line: Option<u64>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.path.to_path_buf(),
            line,
            message: message.into(),
        }
    }

    fn syntax(&self, pos: u64, message: impl Into<String>) -> ConfigError {
        let pos_usize = usize::try_from(pos).unwrap_or(usize::MAX);
        ConfigError::Syntax {
            path: self.path.to_path_buf(),
            line: Some(line_of(self.text, pos_usize)),
            position: Some(pos),
            message: message.into(),
        }
    }

    fn file_line(&self, line: u64) -> String {
        format!("{} line {line}", self.path.display())
    }
}

fn yes_no(ctx: &FileCtx<'_>, f: &Frame, attr: &str) -> Result<bool, ConfigError> {
    match f.attr(attr) {
        None | Some("no") => Ok(false),
        Some("yes") => Ok(true),
        Some(other) => Err(ctx.invalid(
            Some(f.line),
            format!(
                "<{}> attribute {attr}=\"{other}\" must be \"yes\" or \"no\"",
                f.name
            ),
        )),
    }
}

impl<'e> State<'e> {
    fn new(env: Env<'e>) -> Self {
        State {
            env,
            acc: Accum {
                cfg: BusConfig::empty(),
            },
            include_stack: Vec::new(),
        }
    }

    fn warn(&mut self, msg: String) {
        tracing::debug!("config: {msg}");
        self.acc.cfg.warnings.push(msg);
    }

    /// The configuration read.
    fn finish(self) -> BusConfig {
        let mut cfg = self.acc.cfg;
        if cfg.is_system() {
            cfg.policy_rules.append(supervisor_system_policy());
        }
        cfg
    }

    /// Read and parse `path`. `from`/`line` name the including element for
    /// error messages.
    fn include_file(
        &mut self,
        path: &Path,
        ignore_missing: bool,
        from: &Path,
        line: Option<u64>,
    ) -> Result<(), ConfigError> {
        let key = canonical(path);
        if self.include_stack.len() >= MAX_INCLUDE_DEPTH {
            return Err(ConfigError::Invalid {
                path: from.to_path_buf(),
                line,
                message: format!(
                    "including {}: includes nested more than {MAX_INCLUDE_DEPTH} deep",
                    path.display()
                ),
            });
        }
        if self.include_stack.contains(&key) {
            return Err(ConfigError::IncludeLoop {
                path: from.to_path_buf(),
                line,
                included: path.to_path_buf(),
            });
        }
        let text = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && ignore_missing => {
                tracing::debug!("config: {} does not exist, ignored", path.display());
                return Ok(());
            }
            Err(source) => {
                return Err(ConfigError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        self.acc.cfg.source_files.push(path.to_path_buf());
        let text = String::from_utf8(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            line: None,
            message: format!("file is not valid UTF-8: {e}"),
        })?;
        self.include_stack.push(key);
        let r = self.parse_text(&text, path);
        self.include_stack.pop();
        r
    }

    fn include_dir(&mut self, ctx: &FileCtx<'_>, dir: &Path, line: u64) -> Result<(), ConfigError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!("config: include dir {} does not exist", dir.display());
                return Ok(());
            }
            Err(source) => {
                return Err(ConfigError::Io {
                    path: dir.to_path_buf(),
                    source,
                });
            }
        };
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| ConfigError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let name = entry.file_name();
            if name.as_encoded_bytes().ends_with(b".conf") {
                files.push(entry.path());
            }
        }
        files.sort();
        for file in files {
            let snapshot = self.acc.clone();
            if let Err(e) = self.include_file(&file, true, ctx.path, Some(line)) {
                self.acc = snapshot;
                let msg = format!(
                    "{} (included from <includedir> in {}): {e}; file ignored",
                    file.display(),
                    ctx.file_line(line)
                );
                tracing::warn!("config: {msg}");
                self.acc.cfg.warnings.push(msg);
            }
        }
        self.acc.cfg.include_dirs.push(dir.to_path_buf());
        Ok(())
    }

    fn parse_text(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let ctx = FileCtx {
            path,
            base_dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            text,
        };
        let mut reader = Reader::from_str(text);
        let mut stack: Vec<Frame> = Vec::new();
        let mut seen_root = false;
        loop {
            let ev = match reader.read_event() {
                Ok(ev) => ev,
                Err(e) => return Err(ctx.syntax(reader.error_position(), e.to_string())),
            };
            let pos_after = usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX);
            match ev {
                Event::Start(ref e) | Event::Empty(ref e) => {
                    let empty = matches!(ev, Event::Empty(_));
                    let tag_start = text.as_bytes()[..pos_after.min(text.len())]
                        .iter()
                        .rposition(|&b| b == b'<')
                        .unwrap_or(0);
                    let line = line_of(text, tag_start);
                    if stack.is_empty() && seen_root {
                        return Err(
                            ctx.invalid(Some(line), "content after the <busconfig> root element")
                        );
                    }
                    let frame = self.start_element(&ctx, &stack, e, line)?;
                    if frame.kind == Kind::Busconfig {
                        seen_root = true;
                    }
                    stack.push(frame);
                    if empty {
                        self.pop_element(&ctx, &mut stack)?;
                    }
                }
                Event::End(_) => {
                    self.pop_element(&ctx, &mut stack)?;
                }
                Event::Text(t) => {
                    let s = t
                        .decode()
                        .map_err(|e| ctx.syntax(reader.buffer_position(), e.to_string()))?;
                    self.add_text(&ctx, &mut stack, &s, pos_after)?;
                }
                Event::CData(t) => {
                    let s = t
                        .decode()
                        .map_err(|e| ctx.syntax(reader.buffer_position(), e.to_string()))?;
                    self.add_text(&ctx, &mut stack, &s, pos_after)?;
                }
                Event::GeneralRef(r) => {
                    let resolved = match r.resolve_char_ref() {
                        Ok(Some(c)) => c.to_string(),
                        Ok(None) => {
                            let name = r
                                .decode()
                                .map_err(|e| ctx.syntax(reader.buffer_position(), e.to_string()))?;
                            match name.as_ref() {
                                "amp" => "&".to_owned(),
                                "lt" => "<".to_owned(),
                                "gt" => ">".to_owned(),
                                "apos" => "'".to_owned(),
                                "quot" => "\"".to_owned(),
                                other => {
                                    return Err(ctx.syntax(
                                        reader.buffer_position(),
                                        format!("unknown entity &{other};"),
                                    ));
                                }
                            }
                        }
                        Err(e) => return Err(ctx.syntax(reader.buffer_position(), e.to_string())),
                    };
                    self.add_text(&ctx, &mut stack, &resolved, pos_after)?;
                }
                Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
                Event::Eof => break,
            }
        }
        if let Some(open) = stack.last() {
            return Err(ctx.invalid(
                Some(line_of(text, text.len())),
                format!(
                    "unexpected end of file: element <{}> (line {}) is not closed",
                    open.name, open.line
                ),
            ));
        }
        if !seen_root {
            return Err(ctx.invalid(None, "no <busconfig> root element"));
        }
        Ok(())
    }

    fn add_text(
        &mut self,
        ctx: &FileCtx<'_>,
        stack: &mut [Frame],
        s: &str,
        pos: usize,
    ) -> Result<(), ConfigError> {
        match stack.last_mut() {
            Some(f) if f.kind.has_content() => {
                f.content.push_str(s);
                Ok(())
            }
            _ if s.trim().is_empty() => Ok(()),
            Some(f) => Err(ctx.invalid(
                Some(line_of(ctx.text, pos)),
                format!("no text content expected inside <{}>", f.name),
            )),
            None => Err(ctx.invalid(
                Some(line_of(ctx.text, pos)),
                "text content outside of the <busconfig> element",
            )),
        }
    }

    fn start_element(
        &mut self,
        ctx: &FileCtx<'_>,
        stack: &[Frame],
        e: &BytesStart<'_>,
        line: u64,
    ) -> Result<Frame, ConfigError> {
        let name = std::str::from_utf8(e.name().as_ref())
            .map_err(|_| ctx.invalid(Some(line), "element name is not valid UTF-8"))?
            .to_owned();
        let kind = Kind::from_name(&name).ok_or_else(|| {
            ctx.invalid(
                Some(line),
                format!(
                    "unknown element <{name}> in {} (not part of the busconfig DTD)",
                    ctx.path.display()
                ),
            )
        })?;
        let parent = stack.last();
        match (parent, kind.allowed_parent()) {
            (None, None) => {}
            (None, Some(_)) => {
                return Err(ctx.invalid(
                    Some(line),
                    format!("root element must be <busconfig>, not <{name}>"),
                ));
            }
            (Some(p), allowed) if allowed != Some(p.kind) => {
                return Err(ctx.invalid(
                    Some(line),
                    format!("element <{name}> is not allowed inside <{}>", p.name),
                ));
            }
            (Some(_), _) => {}
        }

        let mut attrs: Vec<(String, String)> = Vec::new();
        for attr in e.attributes() {
            let attr = attr.map_err(|err| ctx.invalid(Some(line), format!("<{name}>: {err}")))?;
            let key = std::str::from_utf8(attr.key.as_ref())
                .map_err(|_| ctx.invalid(Some(line), "attribute name is not valid UTF-8"))?
                .to_owned();
            if !kind.allowed_attributes().contains(&key.as_str()) {
                return Err(ctx.invalid(
                    Some(line),
                    format!("Attribute \"{key}\" is invalid on <{name}> element in this context"),
                ));
            }
            let value = attr
                .unescape_value()
                .map_err(|err| ctx.invalid(Some(line), format!("<{name} {key}=...>: {err}")))?
                .into_owned();
            attrs.push((key, value));
        }

        let mut frame = Frame {
            kind,
            name,
            attrs,
            content: String::new(),
            line,
            policy: None,
        };
        self.start_semantics(ctx, parent, &mut frame)?;
        Ok(frame)
    }

    /// Actions taken at the start tag.
    fn start_semantics(
        &mut self,
        ctx: &FileCtx<'_>,
        parent: Option<&Frame>,
        f: &mut Frame,
    ) -> Result<(), ConfigError> {
        let cfg = &mut self.acc.cfg;
        match f.kind {
            Kind::Fork => cfg.fork = true,
            Kind::KeepUmask => cfg.keep_umask = true,
            Kind::Syslog => cfg.syslog = true,
            Kind::StandardSession => {
                if (self.env)("XDG_RUNTIME_DIR").is_none() {
                    tracing::debug!("config: XDG_RUNTIME_DIR unset, no transient service dir");
                }
                for d in standard_session_servicedirs(self.env) {
                    cfg.add_servicedir(d);
                }
            }
            Kind::StandardSystem => {
                for d in standard_system_servicedirs() {
                    cfg.add_servicedir(d);
                }
            }
            Kind::AllowAnonymous => {
                cfg.allow_anonymous = true;
                let msg = format!(
                    "<allow_anonymous/> in {}: ANONYMOUS authentication is not supported by \
                     busvisor; ignored",
                    ctx.file_line(f.line)
                );
                self.warn(msg);
            }
            Kind::Apparmor => {
                let mode = f.attr("mode").unwrap_or("enabled").to_owned();
                if !matches!(mode.as_str(), "enabled" | "disabled" | "required") {
                    return Err(ctx.invalid(
                        Some(f.line),
                        format!(
                            "<apparmor mode=\"{mode}\">: mode must be \"enabled\", \"disabled\" \
                             or \"required\""
                        ),
                    ));
                }
                if mode != "disabled" {
                    let msg = format!(
                        "<apparmor mode=\"{mode}\"> in {}: AppArmor mediation is not supported \
                         by busvisor; ignored",
                        ctx.file_line(f.line)
                    );
                    self.warn(msg);
                }
                self.acc.cfg.apparmor = Some(mode);
            }
            Kind::Selinux => cfg.selinux = true,
            Kind::Associate => {
                if f.attr("own").is_none() || f.attr("context").is_none() {
                    return Err(ctx.invalid(
                        Some(f.line),
                        "<associate> element must have attributes own=\"<servicename>\" and \
                         context=\"<selinux context>\"",
                    ));
                }
                let msg = format!(
                    "SELinux {} in {} is not enforced by busvisor",
                    f.tag(),
                    ctx.file_line(f.line)
                );
                self.warn(msg);
            }
            Kind::Policy => {
                f.policy = Some(self.start_policy(ctx, f)?);
            }
            Kind::Allow | Kind::Deny => {
                let pctx = parent.and_then(|p| p.policy.clone());
                self.rule(ctx, f, pctx)?;
            }
            Kind::Limit if f.attr("name").is_none() => {
                return Err(ctx.invalid(
                    Some(f.line),
                    "<limit> element must have a \"name\" attribute",
                ));
            }
            Kind::Include => {
                yes_no(ctx, f, "ignore_missing")?;
                yes_no(ctx, f, "if_selinux_enabled")?;
                yes_no(ctx, f, "selinux_root_relative")?;
            }
            _ => {}
        }
        Ok(())
    }

    fn start_policy(&mut self, ctx: &FileCtx<'_>, f: &Frame) -> Result<PolicyCtx, ConfigError> {
        let context = match parse::parse_policy(&f.attrs, &SystemAccounts) {
            Ok(Parsed::Value(context)) => Some(context),
            Ok(Parsed::Dropped { warning }) => {
                let msg = format!(
                    "{}: {warning}; the rules of {} are ignored",
                    ctx.file_line(f.line),
                    f.tag()
                );
                self.warn(msg);
                None
            }
            Err(message) => return Err(ctx.invalid(Some(f.line), message)),
        };
        Ok(PolicyCtx { context })
    }

    /// Parse an `<allow>`/`<deny>` like dbus-daemon and file it in
    /// [`BusConfig::policy_rules`].
    fn rule(
        &mut self,
        ctx: &FileCtx<'_>,
        f: &Frame,
        pctx: Option<PolicyCtx>,
    ) -> Result<(), ConfigError> {
        let rule = match parse::parse_rule(f.kind == Kind::Allow, &f.attrs, &SystemAccounts) {
            Ok(Parsed::Value(rule)) => rule,
            Ok(Parsed::Dropped { warning }) => {
                let msg = format!("{}: {warning}; rule ignored", ctx.file_line(f.line));
                self.warn(msg);
                return Ok(());
            }
            Err(message) => return Err(ctx.invalid(Some(f.line), message)),
        };
        // The parent check guarantees a <policy> parent.
        let Some(PolicyCtx {
            context: Some(context),
            ..
        }) = pctx
        else {
            return Ok(());
        };
        self.acc
            .cfg
            .policy_rules
            .add_rule(context, rule)
            .map_err(|message| ctx.invalid(Some(f.line), message))
    }

    fn pop_element(
        &mut self,
        ctx: &FileCtx<'_>,
        stack: &mut Vec<Frame>,
    ) -> Result<(), ConfigError> {
        let Some(f) = stack.pop() else {
            return Err(ctx.invalid(None, "end tag without start tag"));
        };
        if !f.kind.has_content() {
            return Ok(());
        }
        let content = f.content.trim();
        if content.is_empty() {
            return Err(ctx.invalid(
                Some(f.line),
                format!(
                    "XML element <{}> was expected to have content inside it",
                    f.name
                ),
            ));
        }
        let cfg = &mut self.acc.cfg;
        match f.kind {
            Kind::Type => cfg.bus_type = content.to_owned(),
            Kind::Listen => {
                cfg.listen.push(content.to_owned());
                if let Err(e) = address::parse_listen(content) {
                    let msg = format!(
                        "<listen>{content}</listen> in {}: not usable by busvisor: {e}",
                        ctx.file_line(f.line)
                    );
                    self.warn(msg);
                }
            }
            Kind::Auth => {
                cfg.auth.push(content.to_owned());
                if content != "EXTERNAL" {
                    let msg = format!(
                        "<auth>{content}</auth> in {}: only EXTERNAL is supported by busvisor",
                        ctx.file_line(f.line)
                    );
                    self.warn(msg);
                }
            }
            Kind::Servicedir => {
                cfg.add_servicedir(ServiceDir::new(resolve(&ctx.base_dir, content)));
            }
            Kind::Pidfile => cfg.pidfile = Some(PathBuf::from(content)),
            // Honoured by a bus started as root (`daemon::prepare`, the warden).
            Kind::User => cfg.user = Some(content.to_owned()),
            Kind::Servicehelper => {
                cfg.servicehelper = Some(PathBuf::from(content));
                let msg = format!(
                    "<servicehelper> in {}: busvisor starts system services itself (its \
                     root warden does what the helper does); ignored",
                    ctx.file_line(f.line)
                );
                self.warn(msg);
            }
            Kind::Limit => self.limit(ctx, &f, content)?,
            Kind::Include => {
                if yes_no(ctx, &f, "if_selinux_enabled")? {
                    tracing::debug!(
                        "config: skipping {content} (if_selinux_enabled, no SELinux support)"
                    );
                } else if yes_no(ctx, &f, "selinux_root_relative")? {
                    let msg = format!(
                        "<include selinux_root_relative=\"yes\">{content}</include> in {}: \
                         SELinux is not supported by busvisor; skipped",
                        ctx.file_line(f.line)
                    );
                    self.warn(msg);
                } else {
                    let ignore_missing = yes_no(ctx, &f, "ignore_missing")?;
                    let path = resolve(&ctx.base_dir, content);
                    self.include_file(&path, ignore_missing, ctx.path, Some(f.line))?;
                }
            }
            Kind::Includedir => {
                let dir = resolve(&ctx.base_dir, content);
                self.include_dir(ctx, &dir, f.line)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn limit(&mut self, ctx: &FileCtx<'_>, f: &Frame, content: &str) -> Result<(), ConfigError> {
        let name = f.attr("name").unwrap_or_default();
        let value: i64 = content.parse().map_err(|_| {
            ctx.invalid(
                Some(f.line),
                format!("<limit name=\"{name}\">: \"{content}\" is not an integer"),
            )
        })?;
        let value = u64::try_from(value).map_err(|_| {
            ctx.invalid(
                Some(f.line),
                format!("<limit name=\"{name}\"> must be a positive number"),
            )
        })?;
        match self.acc.cfg.limits.set(name, value) {
            Ok(LimitSet::Set) => {}
            Ok(LimitSet::Ignored) => {
                let msg = format!(
                    "<limit name=\"{name}\"> in {}: app-container limits are not used by \
                     busvisor; ignored",
                    ctx.file_line(f.line)
                );
                self.warn(msg);
            }
            Ok(LimitSet::Unknown) => {
                return Err(
                    ctx.invalid(Some(f.line), format!("There is no limit called \"{name}\""))
                );
            }
            Err(m) => return Err(ctx.invalid(Some(f.line), m)),
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Limits;
    use crate::config::tests::fake_env;
    use crate::policy::RuleKind;
    use crate::policy::{Policy, Rule};
    use std::fs;

    const ALLOW_ALL: &str = r#"<policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse(text: &str) -> Result<BusConfig, ConfigError> {
        parse_xml_with_env(text, Path::new("/nonexistent/test.conf"), &no_env)
    }

    fn write(path: &Path, text: &str) {
        fs::write(path, text).unwrap();
    }

    #[test]
    fn basic_elements() {
        let cfg = parse(&format!(
            r#"<?xml version="1.0"?>
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <!-- comment -->
  <type>system</type>
  <type> custom </type>
  <listen>unix:path=/tmp/a</listen>
  <listen>
     unix:tmpdir=/tmp
  </listen>
  <auth>EXTERNAL</auth>
  <fork/>
  <keep_umask/>
  <syslog/>
  <pidfile>/run/x.pid</pidfile>
  <servicedir>/a</servicedir>
  <servicedir>rel/dir</servicedir>
  <servicedir>/a</servicedir>
  <standard_system_servicedirs/>
  <apparmor mode="disabled"/>
  <selinux></selinux>
  {ALLOW_ALL}
</busconfig>"#
        ))
        .unwrap();
        assert_eq!(cfg.bus_type, "custom");
        assert_eq!(cfg.listen, ["unix:path=/tmp/a", "unix:tmpdir=/tmp"]);
        assert_eq!(cfg.auth, ["EXTERNAL"]);
        assert!(cfg.fork && cfg.keep_umask && cfg.syslog && cfg.selinux);
        assert_eq!(cfg.pidfile, Some(PathBuf::from("/run/x.pid")));
        assert_eq!(cfg.apparmor.as_deref(), Some("disabled"));
        let dirs: Vec<_> = cfg.servicedirs.iter().map(|d| d.path.clone()).collect();
        assert_eq!(
            dirs,
            [
                PathBuf::from("/a"),
                PathBuf::from("/nonexistent/rel/dir"),
                PathBuf::from("/usr/local/share/dbus-1/system-services"),
                PathBuf::from("/usr/share/dbus-1/system-services"),
                PathBuf::from("/lib/dbus-1/system-services"),
            ]
        );
        assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        // No limits given: dbus-daemon's built-in defaults.
        assert_eq!(cfg.limits, Limits::DBUS_DAEMON_BUILTIN);
    }

    #[test]
    fn entities_and_cdata() {
        let cfg = parse(
            "<busconfig><listen>unix:path=/tmp/a&amp;b<![CDATA[c]]>&#x64;</listen></busconfig>",
        )
        .unwrap();
        assert_eq!(cfg.listen, ["unix:path=/tmp/a&bcd"]);
        // '&' must be escaped in an address: accepted, with a warning.
        assert!(cfg.warnings.iter().any(|w| w.contains("not usable")));
        assert!(parse("<busconfig><type>&bogus;</type></busconfig>").is_err());
    }

    #[test]
    fn standard_session_dirs_in_place() {
        let env = fake_env(&[
            ("XDG_RUNTIME_DIR", "/run/user/1"),
            ("HOME", "/home/u"),
            ("XDG_DATA_DIRS", "/usr/share:/extra"),
        ]);
        let cfg = parse_xml_with_env(
            "<busconfig><servicedir>/first</servicedir><standard_session_servicedirs/>\
             <servicedir>/last</servicedir><servicedir>/usr/share/dbus-1/services</servicedir>\
             <standard_session_servicedirs/></busconfig>",
            Path::new("/x.conf"),
            &env,
        )
        .unwrap();
        let dirs: Vec<_> = cfg
            .servicedirs
            .iter()
            .map(|d| d.path.display().to_string())
            .collect();
        assert_eq!(
            dirs,
            [
                "/first",
                "/run/user/1/dbus-1/services",
                "/home/u/.local/share/dbus-1/services",
                "/usr/share/dbus-1/services",
                "/extra/dbus-1/services",
                "/last",
            ]
        );
        assert!(cfg.servicedirs[1].strict_naming && !cfg.servicedirs[1].watch);
        assert!(!cfg.servicedirs[0].strict_naming && cfg.servicedirs[0].watch);
    }

    #[test]
    fn limits() {
        let cfg = parse(
            r#"<busconfig>
  <limit name="max_message_size">1000</limit>
  <limit name="auth_timeout"> 5 </limit>
  <limit name="reply_timeout">25000</limit>
  <limit name="max_containers">3</limit>
</busconfig>"#,
        )
        .unwrap();
        assert_eq!(cfg.limits.max_message_size, 1000);
        assert_eq!(cfg.limits.auth_timeout_ms, 5);
        assert_eq!(cfg.limits.reply_timeout_ms, 25000);
        assert_eq!(
            cfg.limits.max_incoming_bytes,
            Limits::DBUS_DAEMON_BUILTIN.max_incoming_bytes
        );
        assert!(cfg.warnings.iter().any(|w| w.contains("max_containers")));
        // dbus-daemon refuses a limit it does not know.
        let e = parse("<busconfig>\n\n<limit name=\"no_such_limit\">3</limit></busconfig>")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/test.conf:3: There is no limit called \"no_such_limit\""
        );

        for bad in [
            r#"<limit name="auth_timeout">-1</limit>"#,
            r#"<limit name="auth_timeout">abc</limit>"#,
            r#"<limit name="auth_timeout">3000000000</limit>"#,
            r#"<limit name="auth_timeout"></limit>"#,
            r#"<limit>5</limit>"#,
            r#"<limit name="x" other="y">5</limit>"#,
        ] {
            let e = parse(&format!("<busconfig>\n{bad}</busconfig>")).unwrap_err();
            assert_eq!(e.line(), Some(2), "{bad}: {e}");
            assert!(matches!(e, ConfigError::Invalid { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_element_error() {
        let e = parse("<busconfig>\n  <type>session</type>\n  <bogus/>\n</busconfig>").unwrap_err();
        let s = e.to_string();
        assert!(s.contains("<bogus>"), "{s}");
        assert!(s.contains("/nonexistent/test.conf"), "{s}");
        assert_eq!(e.line(), Some(3));

        // Known element in the wrong place.
        let e = parse("<busconfig><policy context=\"default\"><type>x</type></policy></busconfig>")
            .unwrap_err();
        assert!(e.to_string().contains("not allowed inside <policy>"), "{e}");
        let e = parse("<busconfig><allow own=\"*\"/></busconfig>").unwrap_err();
        assert!(
            e.to_string().contains("not allowed inside <busconfig>"),
            "{e}"
        );
        let e = parse("<type>x</type>").unwrap_err();
        assert!(e.to_string().contains("root element"), "{e}");
        // Unknown attribute.
        let e = parse("<busconfig><fork now=\"yes\"/></busconfig>").unwrap_err();
        assert!(e.to_string().contains("\"now\""), "{e}");
        // Text where none is expected.
        let e = parse("<busconfig>text</busconfig>").unwrap_err();
        assert!(e.to_string().contains("no text content"), "{e}");
    }

    #[test]
    fn syntax_errors_have_position() {
        for bad in [
            "<busconfig>\n<type>x</typo>\n</busconfig>",
            "<busconfig>\n<type a=>x</type>\n</busconfig>",
            "<busconfig>\n<type>x</type>\n",
            "",
            "<busconfig></busconfig><busconfig></busconfig>",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(e.to_string().starts_with("/nonexistent/test.conf"), "{e}");
            if let ConfigError::Syntax { line, position, .. } = &e {
                assert!(line.is_some() && position.is_some(), "{e}");
            }
        }
        let e = parse("<busconfig>\n<type>x</typo>\n</busconfig>").unwrap_err();
        assert!(
            matches!(e, ConfigError::Syntax { line: Some(2), .. }),
            "{e:?}"
        );
    }

    #[test]
    fn rule_validation() {
        for bad in [
            "<allow/>",
            "<allow send_member=\"Foo\"/>",
            "<allow own=\"a\" user=\"b\"/>",
            "<allow send_destination=\"a\" receive_sender=\"b\"/>",
            "<allow send_type=\"bogus\"/>",
            "<allow send_destination=\"a\" eavesdrop=\"maybe\"/>",
            "<allow send_destination=\"a\" send_destination_prefix=\"b\"/>",
            "<allow send_broadcast=\"true\" send_destination=\"a\"/>",
            "<allow send_error=\"e\" send_interface=\"i\"/>",
            "<allow send_type=\"signal\" max_fds=\"33554433\"/>",
            "<allow bogus=\"x\"/>",
        ] {
            let text = format!("<busconfig><policy context=\"default\">{bad}</policy></busconfig>");
            assert!(parse(&text).is_err(), "{bad} accepted");
        }
        for bad in [
            "<policy/>",
            "<policy context=\"sometimes\"/>",
            "<policy user=\"a\" group=\"b\"/>",
            "<policy at_console=\"maybe\"/>",
        ] {
            assert!(
                parse(&format!("<busconfig>{bad}</busconfig>")).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn ignored_elements_warn() {
        let cfg = parse(
            r#"<busconfig>
  <user>messagebus</user>
  <servicehelper>/usr/lib/helper</servicehelper>
  <allow_anonymous/>
  <apparmor mode="required"/>
  <selinux><associate own="org.foo" context="foo_t"/></selinux>
  <auth>ANONYMOUS</auth>
  <include if_selinux_enabled="yes" selinux_root_relative="yes">contexts/dbus_contexts</include>
</busconfig>"#,
        )
        .unwrap();
        assert_eq!(cfg.user.as_deref(), Some("messagebus"));
        assert!(cfg.allow_anonymous && cfg.selinux);
        assert_eq!(cfg.apparmor.as_deref(), Some("required"));
        assert_eq!(cfg.servicehelper, Some(PathBuf::from("/usr/lib/helper")));
        // <user> is honoured: no warning.
        assert!(!cfg.warnings.iter().any(|w| w.contains("<user>")));
        for needle in [
            "<servicehelper>",
            "allow_anonymous",
            "AppArmor",
            "SELinux <associate",
            "ANONYMOUS</auth>",
        ] {
            assert!(
                cfg.warnings.iter().any(|w| w.contains(needle)),
                "{needle}: {:?}",
                cfg.warnings
            );
        }
        assert!(parse("<busconfig><apparmor mode=\"x\"/></busconfig>").is_err());
        assert!(parse("<busconfig><include ignore_missing=\"y\">a</include></busconfig>").is_err());
    }

    #[test]
    fn includes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("sub")).unwrap();
        write(
            &d.join("main.conf"),
            &format!(
                r#"<busconfig>
  <type>session</type>
  <listen>unix:path=/main</listen>
  <limit name="max_message_size">1</limit>
  <include>sub/a.conf</include>
  <include ignore_missing="yes">missing.conf</include>
  <include ignore_missing="no" if_selinux_enabled="yes">also-missing.conf</include>
  <listen>unix:path=/main2</listen>
  {ALLOW_ALL}
</busconfig>"#
            ),
        );
        // Relative paths in sub/a.conf are relative to sub/.
        write(
            &d.join("sub/a.conf"),
            r#"<busconfig>
  <type>overridden</type>
  <listen>unix:path=/a</listen>
  <servicedir>services</servicedir>
  <limit name="max_message_size">2</limit>
  <include>b.conf</include>
</busconfig>"#,
        );
        write(
            &d.join("sub/b.conf"),
            "<busconfig><auth>EXTERNAL</auth></busconfig>",
        );
        let cfg = load_xml_with_env(&d.join("main.conf"), &no_env).unwrap();
        assert_eq!(cfg.bus_type, "overridden");
        assert_eq!(
            cfg.listen,
            ["unix:path=/main", "unix:path=/a", "unix:path=/main2"]
        );
        assert_eq!(cfg.auth, ["EXTERNAL"]);
        assert_eq!(cfg.limits.max_message_size, 2);
        assert_eq!(cfg.servicedirs, [ServiceDir::new(d.join("sub/services"))]);
        assert_eq!(
            cfg.source_files,
            [
                d.join("main.conf"),
                d.join("sub/a.conf"),
                d.join("sub/b.conf")
            ]
        );
        assert_eq!(cfg.policy_rules, crate::policy::Policy::allow_all());

        // Missing include without ignore_missing is an error naming the file.
        write(
            &d.join("bad.conf"),
            "<busconfig>\n<include>nope.conf</include></busconfig>",
        );
        let e = load_xml_with_env(&d.join("bad.conf"), &no_env).unwrap_err();
        assert!(matches!(e, ConfigError::Io { .. }), "{e}");
        assert!(e.to_string().contains("nope.conf"), "{e}");

        // Missing top-level file.
        assert!(matches!(
            load_xml_with_env(&d.join("absent.conf"), &no_env),
            Err(ConfigError::Io { .. })
        ));

        // Errors in included files name the included file.
        write(&d.join("inner.conf"), "<busconfig>\n\n<oops/></busconfig>");
        write(
            &d.join("outer.conf"),
            "<busconfig><include>inner.conf</include></busconfig>",
        );
        let e = load_xml_with_env(&d.join("outer.conf"), &no_env).unwrap_err();
        assert_eq!(e.path(), d.join("inner.conf"));
        assert_eq!(e.line(), Some(3));
    }

    #[test]
    fn include_loops() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write(
            &d.join("self.conf"),
            "<busconfig><include>self.conf</include></busconfig>",
        );
        let e = load_xml_with_env(&d.join("self.conf"), &no_env).unwrap_err();
        assert!(matches!(e, ConfigError::IncludeLoop { .. }), "{e}");

        write(
            &d.join("a.conf"),
            "<busconfig><include>b.conf</include></busconfig>",
        );
        write(
            &d.join("b.conf"),
            "<busconfig>\n<include>./a.conf</include></busconfig>",
        );
        let e = load_xml_with_env(&d.join("a.conf"), &no_env).unwrap_err();
        assert!(
            matches!(e, ConfigError::IncludeLoop { line: Some(2), .. }),
            "{e}"
        );
        assert!(e.to_string().contains("circular"), "{e}");

        // Including the same file twice (not nested) is fine.
        write(
            &d.join("leaf.conf"),
            "<busconfig><listen>unix:path=/l</listen></busconfig>",
        );
        write(
            &d.join("twice.conf"),
            "<busconfig><include>leaf.conf</include><include>leaf.conf</include></busconfig>",
        );
        let cfg = load_xml_with_env(&d.join("twice.conf"), &no_env).unwrap();
        assert_eq!(cfg.listen.len(), 2);

        // parse_xml's origin takes part in loop detection.
        let text = "<busconfig><include>self.conf</include></busconfig>";
        let e = parse_xml_with_env(text, &d.join("self.conf"), &no_env).unwrap_err();
        assert!(matches!(e, ConfigError::IncludeLoop { .. }), "{e}");
    }

    #[test]
    fn include_depth_limit() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for i in 0..100 {
            write(
                &d.join(format!("{i}.conf")),
                &format!("<busconfig><include>{}.conf</include></busconfig>", i + 1),
            );
        }
        write(&d.join("100.conf"), "<busconfig/>");
        let e = load_xml_with_env(&d.join("0.conf"), &no_env).unwrap_err();
        assert!(e.to_string().contains("nested"), "{e}");
        assert!(load_xml_with_env(&d.join("50.conf"), &no_env).is_ok());
    }

    #[test]
    fn policy_rules_in_order_across_includes() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("conf.d")).unwrap();
        let own = |names: &[&str]| -> String {
            names
                .iter()
                .map(|n| format!("<allow own=\"{n}\"/>"))
                .collect()
        };
        write(
            &d.join("main.conf"),
            &format!(
                "<busconfig><policy context=\"default\">{}</policy>\
                 <include>inc.conf</include><includedir>conf.d</includedir>\
                 <policy context=\"default\">{}</policy>\
                 <policy user=\"root\">{}</policy><policy user=\"0\">{}</policy>\
                 <policy group=\"0\">{}</policy><policy at_console=\"false\">{}</policy>\
                 </busconfig>",
                own(&["a"]),
                own(&["e"]),
                own(&["u1"]),
                own(&["u2"]),
                own(&["g"]),
                own(&["nc"])
            ),
        );
        write(
            &d.join("inc.conf"),
            &format!(
                "<busconfig><policy context=\"mandatory\">{}</policy>\
                 <policy context=\"default\">{}</policy></busconfig>",
                own(&["m"]),
                own(&["b", "c"])
            ),
        );
        write(
            &d.join("conf.d/1.conf"),
            &format!(
                "<busconfig><policy context=\"default\">{}</policy></busconfig>",
                own(&["d"])
            ),
        );
        // Refused, so its rules are rolled back with the rest of it.
        write(
            &d.join("conf.d/2.conf"),
            &format!(
                "<busconfig><policy context=\"default\">{}<allow/></policy></busconfig>",
                own(&["broken"])
            ),
        );
        let cfg = load_xml_with_env(&d.join("main.conf"), &no_env).unwrap();
        let names = |rules: &[Rule]| -> Vec<String> {
            rules
                .iter()
                .map(|r| match &r.kind {
                    RuleKind::Own { name, .. } => name.clone().unwrap_or_default(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let p = &cfg.policy_rules;
        assert_eq!(names(&p.default), ["a", "b", "c", "d", "e"]);
        assert_eq!(names(&p.mandatory), ["m"]);
        assert_eq!(names(&p.by_user[&0]), ["u1", "u2"]);
        assert_eq!(names(&p.by_group[&0]), ["g"]);
        assert_eq!(names(&p.not_at_console), ["nc"]);
        assert!(p.at_console.is_empty());
        let w = cfg
            .warnings
            .iter()
            .find(|w| w.contains("2.conf"))
            .expect("warning for 2.conf");
        assert!(
            w.contains("Element <allow> must have one or more attributes"),
            "{w}"
        );
    }

    #[test]
    fn unknown_users_and_groups_warn_and_drop() {
        let cfg = parse(
            "<busconfig>\n<policy user=\"busvisor-no-such-user\">\
             <deny own=\"x\"/></policy>\n\
             <policy group=\"busvisor-no-such-group\"><allow own=\"y\"/></policy>\n\
             <policy context=\"default\"><allow user=\"busvisor-no-such-user\"/>\
             <deny group=\"busvisor-no-such-group\"/><allow own=\"z\"/></policy>\n\
             </busconfig>",
        )
        .unwrap();
        let mut expected = Policy::default();
        expected.default.push(Rule {
            allow: true,
            kind: RuleKind::Own {
                name: Some("z".into()),
                prefix: false,
            },
        });
        assert_eq!(cfg.policy_rules, expected);
        for (line, text) in [
            (
                2,
                "Unknown username \"busvisor-no-such-user\" in message bus configuration file",
            ),
            (
                3,
                "Unknown group \"busvisor-no-such-group\" in message bus configuration file",
            ),
            (
                4,
                "Unknown username \"busvisor-no-such-user\" on element <allow>",
            ),
            (
                4,
                "Unknown group \"busvisor-no-such-group\" on element <deny>",
            ),
        ] {
            let at = format!("/nonexistent/test.conf line {line}: {text}");
            assert!(
                cfg.warnings.iter().any(|w| w.starts_with(&at)),
                "{at}: {:?}",
                cfg.warnings
            );
        }
        // A bad rule in a dropped policy is still an error, as in dbus-daemon.
        let e = parse(
            "<busconfig><policy user=\"busvisor-no-such-user\">\n<allow/></policy></busconfig>",
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/test.conf:2: Element <allow> must have one or more attributes"
        );
    }

    #[test]
    fn connection_rules_in_per_user_policies() {
        for (policy, rule, per) in [
            (
                "user=\"root\"",
                "<allow user=\"*\"/>",
                "<allow> rule cannot be per-user",
            ),
            (
                "group=\"0\"",
                "<deny group=\"0\"/>",
                "<deny> rule cannot be per-group",
            ),
        ] {
            let e = parse(&format!(
                "<busconfig>\n<policy {policy}>\n{rule}</policy></busconfig>"
            ))
            .unwrap_err();
            assert_eq!(
                e.to_string(),
                format!("/nonexistent/test.conf:3: {per} because it has bus-global semantics")
            );
        }
        let cfg = parse(
            "<busconfig><policy at_console=\"true\"><allow user=\"root\"/></policy></busconfig>",
        )
        .unwrap();
        assert_eq!(
            cfg.policy_rules.at_console,
            [Rule {
                allow: true,
                kind: RuleKind::User(Some(0))
            }]
        );
    }

    #[test]
    fn includedir() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir(d.join("conf.d")).unwrap();
        for (name, listen) in [("20-b.conf", "b"), ("10-a.conf", "a"), ("30-c.conf", "c")] {
            write(
                &d.join("conf.d").join(name),
                &format!("<busconfig><listen>unix:path=/{listen}</listen></busconfig>"),
            );
        }
        write(&d.join("conf.d/zz.txt"), "<busconfig><bogus/></busconfig>");
        // A broken file is skipped entirely (its first <listen> is rolled
        // back) with a warning.
        write(
            &d.join("conf.d/25-broken.conf"),
            "<busconfig><listen>unix:path=/broken</listen><bogus/></busconfig>",
        );
        write(
            &d.join("main.conf"),
            "<busconfig><listen>unix:path=/main</listen><includedir>conf.d</includedir>\
             <includedir>missing.d</includedir><listen>unix:path=/end</listen></busconfig>",
        );
        let cfg = load_xml_with_env(&d.join("main.conf"), &no_env).unwrap();
        assert_eq!(
            cfg.listen,
            [
                "unix:path=/main",
                "unix:path=/a",
                "unix:path=/b",
                "unix:path=/c",
                "unix:path=/end"
            ]
        );
        assert!(
            cfg.warnings.iter().any(|w| w.contains("25-broken.conf")),
            "{:?}",
            cfg.warnings
        );
        assert_eq!(cfg.include_dirs, [d.join("conf.d")]);
        assert!(!cfg.source_files.contains(&d.join("conf.d/zz.txt")));
    }

    #[test]
    fn real_session_conf() {
        let path = Path::new("/usr/share/dbus-1/session.conf");
        if !path.exists() {
            eprintln!("{} not installed; skipped", path.display());
            return;
        }
        let env = fake_env(&[("HOME", "/home/u"), ("XDG_RUNTIME_DIR", "/run/user/1000")]);
        let cfg = load_xml_with_env(path, &env).unwrap();
        assert_eq!(cfg.bus_type, "session");
        assert_eq!(cfg.listen, ["unix:tmpdir=/tmp"]);
        assert_eq!(cfg.auth, ["EXTERNAL"]);
        assert!(cfg.keep_umask);
        assert_eq!(cfg.limits, Limits::SESSION_CONF);
        assert_eq!(cfg.servicedirs, standard_session_servicedirs(&env));
        assert_eq!(cfg.source_files.first().map(PathBuf::as_path), Some(path));
        // Local additions in /etc/dbus-1/session.d may add policies; with a
        // stock installation the result is allow-all.
        if cfg.source_files.len() == 1 {
            assert_eq!(cfg.policy_rules, crate::policy::Policy::allow_all());
            assert!(cfg.warnings.is_empty(), "{:?}", cfg.warnings);
        }
    }

    #[test]
    fn embedded_matches_debian_session_conf() {
        let env = fake_env(&[("HOME", "/h")]);
        let embedded = crate::config::session_default_with_env(&env);
        assert_eq!(embedded.limits, Limits::SESSION_CONF);
        if let Ok(debian) = load_xml_with_env(Path::new("/usr/share/dbus-1/session.conf"), &env) {
            assert_eq!(embedded.limits, debian.limits);
            assert_eq!(embedded.listen, debian.listen);
            assert_eq!(embedded.auth, debian.auth);
            assert_eq!(embedded.servicedirs, debian.servicedirs);
            assert_eq!(embedded.keep_umask, debian.keep_umask);
        }
    }

    #[test]
    fn a_system_bus_gets_the_control_api_rules_after_its_own() {
        use crate::policy::{Rule, RuleKind};
        let cfg = parse_xml_with_env(super::super::SYSTEM_CONF, Path::new("system.conf"), &|_| {
            None
        })
        .unwrap();
        let names = |rules: &[Rule]| -> Vec<(bool, Option<String>)> {
            rules
                .iter()
                .filter_map(|r| match &r.kind {
                    RuleKind::Send(m) | RuleKind::Receive(m) => {
                        Some((r.allow, m.member.clone().or(m.name.clone())))
                    }
                    _ => None,
                })
                .collect()
        };
        let root = names(&cfg.policy_rules.by_user[&0]);
        assert_eq!(
            root[root.len() - 2..],
            [
                (true, Some("org.busvisor.Supervisor1".into())),
                (true, Some("LogLine".into()))
            ],
            "{root:?}"
        );
        let default = names(&cfg.policy_rules.default);
        assert_eq!(
            default.last(),
            Some(&(false, Some("LogLine".into()))),
            "{default:?}"
        );
        // A session bus gets none of it.
        let session = parse_xml_with_env(
            super::super::SESSION_CONF,
            Path::new("session.conf"),
            &|_| None,
        )
        .unwrap();
        assert!(session.policy_rules.by_user.is_empty());
    }
}
