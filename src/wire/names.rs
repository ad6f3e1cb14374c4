//! Every D-Bus name, path, interface and error name busvisor uses: one copy,
//! for the bus, the supervisor and the CLI client alike.

/// The bus driver's name, path and interfaces.
pub const BUS_NAME: &str = "org.freedesktop.DBus";
pub const BUS_PATH: &str = "/org/freedesktop/DBus";
pub const IFACE_DBUS: &str = "org.freedesktop.DBus";
pub const IFACE_PROPS: &str = "org.freedesktop.DBus.Properties";
pub const IFACE_INTROSPECT: &str = "org.freedesktop.DBus.Introspectable";
pub const IFACE_PEER: &str = "org.freedesktop.DBus.Peer";
pub const IFACE_MONITORING: &str = "org.freedesktop.DBus.Monitoring";
pub const IFACE_STATS: &str = "org.freedesktop.DBus.Debug.Stats";
/// Reserved for what a client library tells itself (its `Disconnected`):
/// never on the wire.
pub const LOCAL_PATH: &str = "/org/freedesktop/DBus/Local";
pub const IFACE_LOCAL: &str = "org.freedesktop.DBus.Local";

/// busvisor's control API: a name the bus itself owns.
pub const SUPERVISOR_NAME: &str = "org.busvisor.Supervisor1";
pub const SUPERVISOR_PATH: &str = "/org/busvisor/Supervisor1";
pub const SUPERVISOR_IFACE: &str = "org.busvisor.Supervisor1";
pub const SERVICE_IFACE: &str = "org.busvisor.Service1";
pub const SERVICE_PATH_PREFIX: &str = "/org/busvisor/Supervisor1/service/";

/// systemd, for `--systemd-activation`: its name, and the interface of the
/// signals it and the bus exchange (ActivationRequest, ActivationFailure).
pub const SYSTEMD_NAME: &str = "org.freedesktop.systemd1";
pub const SYSTEMD_ACTIVATOR_IFACE: &str = "org.freedesktop.systemd1.Activator";

/// The DOCTYPE line every introspection document starts with.
pub const INTROSPECT_HEADER: &str = "<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n\"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n";

/// The standard interfaces every object of the bus implements.
pub const STANDARD_XML: &str = r#"  <interface name="org.freedesktop.DBus.Properties">
    <method name="Get">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="out"/>
    </method>
    <method name="GetAll">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="properties" type="a{sv}" direction="out"/>
    </method>
    <method name="Set">
      <arg name="interface_name" type="s" direction="in"/>
      <arg name="property_name" type="s" direction="in"/>
      <arg name="value" type="v" direction="in"/>
    </method>
    <signal name="PropertiesChanged">
      <arg name="interface_name" type="s"/>
      <arg name="changed_properties" type="a{sv}"/>
      <arg name="invalidated_properties" type="as"/>
    </signal>
  </interface>
  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg name="xml_data" type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping"/>
    <method name="GetMachineId">
      <arg name="machine_uuid" type="s" direction="out"/>
    </method>
  </interface>
"#;

/// The error names: one row each, so that the enum, its text and the list
/// [`ErrorName::parse`] searches cannot disagree.
macro_rules! error_names {
    ($( $(#[$doc:meta])* $variant:ident => $text:literal, )*) => {
        /// D-Bus error names, by the kinds the bus and the supervisor answer with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum ErrorName {
            $( $(#[$doc])* $variant, )*
        }

        impl ErrorName {
            /// Every error name, to look one up by its text.
            const ALL: &[ErrorName] = &[$(ErrorName::$variant,)*];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $( ErrorName::$variant => $text, )*
                }
            }
        }
    };
}

error_names! {
    ServiceUnknown => "org.freedesktop.DBus.Error.ServiceUnknown",
    NameHasNoOwner => "org.freedesktop.DBus.Error.NameHasNoOwner",
    NoReply => "org.freedesktop.DBus.Error.NoReply",
    LimitsExceeded => "org.freedesktop.DBus.Error.LimitsExceeded",
    InvalidArgs => "org.freedesktop.DBus.Error.InvalidArgs",
    UnknownMethod => "org.freedesktop.DBus.Error.UnknownMethod",
    UnknownInterface => "org.freedesktop.DBus.Error.UnknownInterface",
    UnknownProperty => "org.freedesktop.DBus.Error.UnknownProperty",
    PropertyReadOnly => "org.freedesktop.DBus.Error.PropertyReadOnly",
    AccessDenied => "org.freedesktop.DBus.Error.AccessDenied",
    MatchRuleInvalid => "org.freedesktop.DBus.Error.MatchRuleInvalid",
    MatchRuleNotFound => "org.freedesktop.DBus.Error.MatchRuleNotFound",
    NotSupported => "org.freedesktop.DBus.Error.NotSupported",
    Failed => "org.freedesktop.DBus.Error.Failed",
    TimedOut => "org.freedesktop.DBus.Error.TimedOut",
    UnixProcessIdUnknown => "org.freedesktop.DBus.Error.UnixProcessIdUnknown",
    AdtAuditDataUnknown => "org.freedesktop.DBus.Error.AdtAuditDataUnknown",
    SELinuxSecurityContextUnknown => "org.freedesktop.DBus.Error.SELinuxSecurityContextUnknown",
    SpawnExecFailed => "org.freedesktop.DBus.Error.Spawn.ExecFailed",
    SpawnChildExited => "org.freedesktop.DBus.Error.Spawn.ChildExited",
    SpawnChildSignaled => "org.freedesktop.DBus.Error.Spawn.ChildSignaled",
    /// The system bus's activation errors, as dbus-daemon reports its
    /// launch helper's exit codes (bus/activation.c).
    SpawnFileInvalid => "org.freedesktop.DBus.Error.Spawn.FileInvalid",
    SpawnServiceNotFound => "org.freedesktop.DBus.Error.Spawn.ServiceNotFound",
    SpawnFailedToSetup => "org.freedesktop.DBus.Error.Spawn.FailedToSetup",
    SpawnConfigInvalid => "org.freedesktop.DBus.Error.Spawn.ConfigInvalid",
    SpawnServiceNotValid => "org.freedesktop.DBus.Error.Spawn.ServiceNotValid",
    SpawnPermissionsInvalid => "org.freedesktop.DBus.Error.Spawn.PermissionsInvalid",
    NoMemory => "org.freedesktop.DBus.Error.NoMemory",
    /// busvisor's control API: no service by that id or name.
    NoSuchService => "org.busvisor.Supervisor1.Error.NoSuchService",
    /// busvisor's control API: Start or Restart did not reach `running`.
    StartFailed => "org.busvisor.Supervisor1.Error.StartFailed",
}

impl ErrorName {
    /// The error name whose text is `s` (errors that crossed a process
    /// boundary as text, from the warden).
    pub fn parse(s: &str) -> Option<ErrorName> {
        Self::ALL.iter().copied().find(|e| e.as_str() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::ErrorName;

    #[test]
    fn every_error_name_is_found_by_its_text() {
        for e in ErrorName::ALL {
            assert_eq!(ErrorName::parse(e.as_str()), Some(*e));
        }
        assert_eq!(
            ErrorName::parse("org.freedesktop.DBus.Error.Spawn.FileInvalid"),
            Some(ErrorName::SpawnFileInvalid)
        );
        assert_eq!(ErrorName::parse("org.example.Nope"), None);
    }
}
