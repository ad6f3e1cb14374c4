//! The message bus core: peers, names, match rules, expected replies,
//! monitors and the queues of messages waiting for a name.
//!
//! It never names a service, a definition file or a process other than a
//! peer's credentials, never spawns a task, and does no file I/O under its
//! lock. What it needs from whoever starts services it asks through
//! [`Activator`]; what that side needs from the bus are the `pub(crate)`
//! methods of [`BusState`] (see `state.rs`).
//!
//! Each peer's reader task calls [`Bus::handle`] with a message whose sender
//! field it has already stamped. `handle` takes the one lock, decides every
//! recipient, pushes the message into their outboxes and returns; it never
//! awaits, so the lock is never held across an await and a slow peer can only
//! fill its own outbox. Because one lock orders all state changes, the
//! messages caused by one event (NameOwnerChanged, NameLost, NameAcquired,
//! replies) reach every queue in one consistent order.

pub(crate) mod driver;
pub(crate) mod matching;
pub(crate) mod names;
pub(crate) mod outbox;
pub(crate) mod peer;
pub(crate) mod pending;
mod policy;
pub(crate) mod reply;
mod router;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::config::Limits;
use crate::wire::{BusError, Message};
pub(crate) use outbox::{Cutter, Outbox};
pub(crate) use peer::{Credentials, Identity, PeerId, unique_name};
pub(crate) use state::BusState;

/// What the reader should do after handing a message to the bus.
#[derive(Debug)]
pub(crate) enum Verdict {
    Continue,
    Disconnect(&'static str),
    /// Routed; the sender should wait for this recipient's queue to drain
    /// before sending more (it is reading, but slower than the sender).
    Wait(Arc<Outbox>),
}

/// A call the bus answers later, where the work completes: its caller and
/// the call itself (its serial and flags; a shared handle, not a copy).
#[derive(Clone, Debug)]
pub(crate) struct CallRef {
    pub(crate) from: PeerId,
    pub(crate) call: Message,
}

/// Who asked for a start, as lifecycle events report it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Requester {
    pub(crate) name: String,
    pub(crate) pid: Option<u32>,
}

/// The result of a method the bus answers: a reply, nothing yet (answered
/// later, or by the handler itself), or an error.
pub(crate) type Answer = Result<Option<Message>, BusError>;

/// What starts services: the bus core's only view of the supervisor. Every
/// call happens under the core lock, with the core at hand.
pub(crate) trait Activator {
    /// Whether a loaded definition provides `name` (no file I/O).
    fn provides(&self, name: &str) -> bool;
    /// Every activatable name, for ListActivatableNames.
    fn activatable_names(&self) -> Vec<String>;
    /// Someone waits for `name`, which has no owner: start what provides it,
    /// or find out off the lock whether anything does. Ok means the waiter
    /// is queued and will be delivered, or failed through
    /// [`BusState::fail_pending`].
    fn start(
        &mut self,
        name: &str,
        requester: Requester,
        core: &mut BusState,
    ) -> Result<(), BusError>;
    /// `name` changed owner (announced already; NameAcquired not yet).
    fn name_owner_changed(
        &mut self,
        name: &str,
        old: Option<PeerId>,
        new: Option<PeerId>,
        core: &mut BusState,
    );
    /// systemd could not start `unit` (its ActivationFailure, checked to
    /// come from the owner of its name): fail every start waiting for that
    /// unit with `e`, through [`BusState::fail_pending`].
    fn systemd_failed(&mut self, unit: &str, e: &BusError, core: &mut BusState);
    /// UpdateActivationEnvironment, in the caller's order.
    fn set_activation_env(&mut self, vars: Vec<(String, String)>, core: &mut BusState);
    /// Re-read the definitions, off the lock; answer `caller` once done.
    fn reload(&mut self, caller: Option<CallRef>);
    /// A method call to the name the activator answers (the control API).
    fn call(&mut self, call: &CallRef, facts: &Facts, core: &mut BusState) -> Answer;
}

/// What the bus knows from the start and never changes.
pub(crate) struct Facts {
    pub(crate) guid: String,
    pub(crate) limits: Limits,
    pub(crate) uid: u32,
    pub(crate) pid: u32,
    pub(crate) machine_id: String,
    /// The address clients use, once listening.
    pub(crate) address: std::sync::OnceLock<String>,
    /// `--systemd-activation` (listed in Features).
    pub(crate) systemd_activation: bool,
    /// A system bus (`<type>system</type>`): services run as their own
    /// users with an environment of the bus's making, so
    /// UpdateActivationEnvironment is refused, as dbus-daemon refuses it
    /// where a launch helper starts services.
    pub(crate) system_bus: bool,
    /// Group lists by (uid, primary gid), looked up once (a session bus sees one uid).
    groups: Mutex<HashMap<(u32, u32), Vec<u32>>>,
}

impl Facts {
    /// The bus's own uid or root: may connect, monitor and change the
    /// activation environment.
    pub(crate) fn is_privileged(&self, uid: Option<u32>) -> bool {
        uid == Some(self.uid) || uid == Some(0)
    }

    /// The sorted groups of a user (primary and supplementary), from the
    /// user database: only for kernels without SO_PEERGROUPS.
    pub(crate) fn groups_of(&self, uid: u32, gid: u32) -> Vec<u32> {
        let mut cache = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        cache
            .entry((uid, gid))
            .or_insert_with(|| {
                let user = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                    .ok()
                    .flatten();
                let mut gids: Vec<u32> = user
                    .and_then(|u| {
                        let name = std::ffi::CString::new(u.name).ok()?;
                        nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid)).ok()
                    })
                    .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
                    .unwrap_or_else(|| vec![gid]);
                gids.sort_unstable();
                gids.dedup();
                gids
            })
            .clone()
    }
}

/// The bus core and the activator, behind one lock: the lock orders every
/// change of both.
pub(crate) struct Shared<S> {
    pub(crate) core: BusState,
    pub(crate) sup: S,
}

/// The bus: fixed facts and the locked state.
pub(crate) struct Bus<S> {
    state: Mutex<Shared<S>>,
    pub(crate) facts: Facts,
    /// The number of the next unique name; given out at Hello, from 0, as dbus-daemon does.
    next_unique: std::sync::atomic::AtomicU64,
}

impl<S: Activator> Bus<S> {
    /// `own_name` is the name the activator answers as the bus.
    pub(crate) fn new(
        guid: String,
        machine_id: String,
        limits: Limits,
        own_name: &'static str,
        policy: crate::policy::Policy,
        sup: S,
    ) -> Self {
        Bus {
            state: Mutex::new(Shared {
                core: BusState::new(limits, own_name, policy),
                sup,
            }),
            facts: Facts {
                guid,
                limits,
                uid: nix::unistd::getuid().as_raw(),
                pid: std::process::id(),
                machine_id,
                address: std::sync::OnceLock::new(),
                systemd_activation: false,
                system_bus: false,
                groups: Mutex::new(HashMap::new()),
            },
            next_unique: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Shared<S>> {
        // A panic while routing must not take the bus down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Register a connection that sent Hello; its id is its unique name's number.
    pub(crate) fn add_peer(
        &self,
        outbox: Arc<Outbox>,
        cutter: Arc<Cutter>,
        who: Identity,
    ) -> PeerId {
        let id = self
            .next_unique
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().core.add_peer(id, outbox, cutter, who);
        id
    }

    /// Whether the policy lets `uid` (in `groups`) connect.
    pub(crate) fn may_connect(&self, uid: u32, groups: &[u32]) -> bool {
        self.lock().core.may_connect(uid, groups, self.facts.uid)
    }

    pub(crate) fn peer_count(&self) -> usize {
        self.lock().core.peer_count()
    }

    /// Cut every connection (shutdown).
    pub(crate) fn cut_all(&self) {
        self.lock().core.cut_all();
    }

    /// Route one message from `from`; its sender field is already stamped.
    pub(crate) fn handle(&self, from: PeerId, msg: Message) -> Verdict {
        let mut guard = self.lock();
        let Shared { core, sup } = &mut *guard;
        core.handle(&self.facts, sup, from, msg)
    }

    /// Answer calls that get no reply within `reply_timeout` with NoReply.
    /// The daemon runs this only when the limit is set: it sleeps until the
    /// earliest deadline, or until a call makes one.
    pub(crate) async fn expire_replies(self: Arc<Self>) {
        let wake = self.lock().core.reply_timer.clone();
        loop {
            let next = self.lock().core.replies.next_deadline();
            match next {
                None => wake.notified().await,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {}
                        _ = wake.notified() => {}
                    }
                }
            }
            self.lock().core.expire_replies(std::time::Instant::now());
        }
    }

    /// A peer's connection ended.
    pub(crate) fn remove_peer(&self, id: PeerId) {
        let mut guard = self.lock();
        let Shared { core, sup } = &mut *guard;
        core.goodbye(id, None, sup);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ErrorName, Type, names};

    /// An activator that provides one name and records what it is told.
    #[derive(Default)]
    struct Stub {
        started: Vec<String>,
        owners: Vec<(String, Option<PeerId>, Option<PeerId>)>,
        env: Vec<(String, String)>,
        /// Starts by asking systemd, as `--systemd-activation` does.
        via_systemd: bool,
    }

    const SVC: &str = "org.example.Svc";
    const SYSTEMD: &str = names::SYSTEMD_NAME;

    impl Activator for Stub {
        fn provides(&self, name: &str) -> bool {
            name == SVC
        }
        fn activatable_names(&self) -> Vec<String> {
            vec![SVC.into()]
        }
        fn start(&mut self, name: &str, _: Requester, core: &mut BusState) -> Result<(), BusError> {
            if name != SVC {
                return Err(BusError::new(ErrorName::ServiceUnknown, name));
            }
            let first = !self.started.iter().any(|n| n == name);
            self.started.push(name.into());
            if self.via_systemd && first {
                let req = crate::wire::signal(
                    names::BUS_PATH,
                    names::SYSTEMD_ACTIVATOR_IFACE,
                    "ActivationRequest",
                    Some(SYSTEMD),
                    &("svc.service",),
                );
                core.apart(|core| core.send_from_bus_to_name(SYSTEMD, req.unwrap()));
            }
            Ok(())
        }
        fn name_owner_changed(
            &mut self,
            name: &str,
            old: Option<PeerId>,
            new: Option<PeerId>,
            _: &mut BusState,
        ) {
            self.owners.push((name.into(), old, new));
        }
        fn systemd_failed(&mut self, unit: &str, e: &BusError, core: &mut BusState) {
            if unit == "svc.service" {
                core.fail_pending(&[SVC.to_owned()], e);
            }
        }
        fn set_activation_env(&mut self, vars: Vec<(String, String)>, _: &mut BusState) {
            self.env.extend(vars);
        }
        fn reload(&mut self, _: Option<CallRef>) {}
        fn call(&mut self, _: &CallRef, _: &Facts, _: &mut BusState) -> Answer {
            Err(BusError::failed("no control API here"))
        }
    }

    struct Peer {
        id: PeerId,
        outbox: Arc<Outbox>,
        // Keeps the other end of the socket open.
        _far: tokio::net::UnixStream,
    }

    fn bus() -> Bus<Stub> {
        Bus::new(
            "0123".into(),
            "0123".into(),
            Limits::default(),
            names::SUPERVISOR_NAME,
            crate::policy::Policy::allow_all(),
            Stub::default(),
        )
    }

    fn connect(bus: &Bus<Stub>) -> Peer {
        let (near, far) = tokio::net::UnixStream::pair().unwrap();
        let outbox = Arc::new(Outbox::new(1 << 20, 16, true));
        let cutter = Arc::new(Cutter::new(Arc::new(near)));
        let who = Identity {
            creds: Credentials {
                uid: Some(bus.facts.uid),
                ..Credentials::default()
            },
            ..Identity::default()
        };
        let id = bus.add_peer(outbox.clone(), cutter, who);
        let hello = Message::method_call(names::BUS_PATH, "Hello")
            .sender(unique_name(id))
            .destination(names::BUS_NAME)
            .interface(names::IFACE_DBUS)
            .build(&())
            .unwrap();
        assert!(matches!(bus.handle(id, hello), Verdict::Continue));
        let p = Peer {
            id,
            outbox,
            _far: far,
        };
        drain(&p);
        p
    }

    fn call<B>(from: &Peer, dest: &str, member: &str, serial: u32, body: &B) -> Message
    where
        B: serde::Serialize + crate::wire::DynamicType,
    {
        let iface = if dest == names::BUS_NAME {
            names::IFACE_DBUS
        } else {
            "org.example.I"
        };
        Message::method_call("/", member)
            .sender(unique_name(from.id))
            .destination(dest)
            .interface(iface)
            .serial(std::num::NonZeroU32::new(serial).unwrap())
            .build(body)
            .unwrap()
    }

    /// What the peer was sent, as "kind member-or-error", emptying its queue.
    fn drain(p: &Peer) -> Vec<String> {
        let mut batch = Vec::new();
        let fut = p.outbox.next_batch(&mut batch);
        let got = futures_util::FutureExt::now_or_never(fut);
        if got.is_none() {
            return Vec::new();
        }
        p.outbox.sent(&batch);
        batch
            .iter()
            .map(|m| {
                let h = m.header();
                match m.message_type() {
                    Type::MethodReturn => format!("return {}", h.reply_serial().unwrap()),
                    Type::Error => format!("error {}", h.error_name().unwrap().as_str()),
                    _ => format!("{:?} {}", m.message_type(), h.member().unwrap().as_str()),
                }
            })
            .collect()
    }

    #[tokio::test]
    async fn a_leaving_callee_gets_its_callers_no_reply() {
        let bus = bus();
        let (a, b) = (connect(&bus), connect(&bus));
        bus.handle(a.id, call(&a, &unique_name(b.id), "Work", 5, &()));
        assert_eq!(drain(&b), ["MethodCall Work"]);
        bus.remove_peer(b.id);
        assert_eq!(drain(&a), ["error org.freedesktop.DBus.Error.NoReply"]);
        assert_eq!(bus.lock().core.calls_pending_to(b.id), 0);
    }

    #[tokio::test]
    async fn a_taken_name_gets_what_waited_for_it_in_order() {
        let bus = bus();
        let (caller, starter) = (connect(&bus), connect(&bus));
        bus.handle(caller.id, call(&caller, SVC, "Work", 7, &()));
        let sbn = call(
            &starter,
            names::BUS_NAME,
            "StartServiceByName",
            3,
            &(SVC, 0u32),
        );
        bus.handle(starter.id, sbn);
        // Each waiter asks; the activator starts what is not starting yet.
        assert_eq!(bus.lock().sup.started, [SVC, SVC]);
        let service = connect(&bus);
        let req = call(&service, names::BUS_NAME, "RequestName", 9, &(SVC, 0u32));
        bus.handle(service.id, req);
        assert_eq!(drain(&starter), ["return 3"], "StartServiceByName answered");
        assert_eq!(
            drain(&service),
            ["Signal NameAcquired", "MethodCall Work", "return 9"],
            "NameAcquired, then the queued call, then the RequestName reply"
        );
        let owners = &bus.lock().sup.owners;
        assert_eq!(
            owners.last(),
            Some(&(SVC.to_owned(), None, Some(service.id)))
        );
    }

    #[tokio::test]
    async fn a_refused_start_answers_the_caller() {
        let bus = bus();
        let a = connect(&bus);
        bus.handle(a.id, call(&a, "org.example.Nobody", "Work", 2, &()));
        assert_eq!(
            drain(&a),
            ["error org.freedesktop.DBus.Error.ServiceUnknown"]
        );
        assert_eq!(bus.lock().core.pending.count(), 0);
    }

    fn become_monitor(bus: &Bus<Stub>, p: &Peer, rules: &[&str]) {
        let monitor = Message::method_call(names::BUS_PATH, "BecomeMonitor")
            .sender(unique_name(p.id))
            .destination(names::BUS_NAME)
            .interface(names::IFACE_MONITORING)
            .build(&(rules, 0u32))
            .unwrap();
        bus.handle(p.id, monitor);
        drain(p);
    }

    /// A unicast signal from `from` to `dest`.
    fn poke(from: &Peer, dest: &str, member: &str) -> Message {
        Message::signal("/", "org.example.I", member)
            .sender(unique_name(from.id))
            .destination(dest)
            .build(&())
            .unwrap()
    }

    fn take_name(bus: &Bus<Stub>, p: &Peer, name: &str) {
        bus.handle(
            p.id,
            call(p, names::BUS_NAME, "RequestName", 40, &(name, 0u32)),
        );
    }

    fn activation_failure(from: &Peer, body: &(&str, &str, &str)) -> Message {
        Message::signal(
            "/org/freedesktop/systemd1",
            names::SYSTEMD_ACTIVATOR_IFACE,
            "ActivationFailure",
        )
        .sender(unique_name(from.id))
        .destination(names::BUS_NAME)
        .build(body)
        .unwrap()
    }

    #[tokio::test]
    async fn monitors_see_an_activation_request_before_its_cause_and_once() {
        let bus = bus();
        bus.lock().sup.via_systemd = true;
        let (monitor, caller) = (connect(&bus), connect(&bus));
        become_monitor(&bus, &monitor, &[]);
        bus.handle(caller.id, poke(&caller, SVC, "Poke"));
        // dbus-daemon sends the request in a transaction of its own, done
        // before the one of the message that caused it.
        assert_eq!(drain(&monitor), ["Signal ActivationRequest", "Signal Poke"]);
        let systemd = connect(&bus);
        drain(&monitor);
        take_name(&bus, &systemd, SYSTEMD);
        assert_eq!(
            drain(&systemd),
            [
                "Signal NameAcquired",
                "Signal ActivationRequest",
                "return 40"
            ]
        );
        assert_eq!(
            drain(&monitor),
            [
                "MethodCall RequestName",
                "Signal NameOwnerChanged",
                "Signal NameAcquired",
                "return 40"
            ],
            "the request is not captured a second time when it is delivered"
        );
    }

    #[tokio::test]
    async fn an_activation_failure_from_systemd_fails_the_waiters_first() {
        let mut bus = bus();
        bus.facts.systemd_activation = true;
        bus.lock().sup.via_systemd = true;
        let (monitor, caller, systemd) = (connect(&bus), connect(&bus), connect(&bus));
        take_name(&bus, &systemd, SYSTEMD);
        drain(&systemd);
        become_monitor(&bus, &monitor, &[]);
        bus.handle(caller.id, poke(&caller, SVC, "Poke"));
        bus.handle(caller.id, call(&caller, SVC, "Work", 8, &()));
        assert_eq!(drain(&systemd), ["Signal ActivationRequest"]);
        drain(&monitor);
        // Only the owner of systemd's name is believed.
        let body = ("svc.service", "com.example.Nope", "Computer says no");
        bus.handle(caller.id, activation_failure(&caller, &body));
        assert!(drain(&caller).is_empty());
        assert_eq!(drain(&monitor), ["Signal ActivationFailure"]);
        assert_eq!(bus.lock().core.pending.count(), 2);
        bus.handle(systemd.id, activation_failure(&systemd, &body));
        // Every waiter gets systemd's error, even the signal, as from dbus-daemon.
        assert_eq!(
            drain(&caller),
            ["error com.example.Nope", "error com.example.Nope"]
        );
        assert_eq!(
            drain(&monitor),
            [
                "error com.example.Nope",
                "error com.example.Nope",
                "Signal ActivationFailure"
            ],
            "the errors go first, in a transaction of their own"
        );
        assert_eq!(bus.lock().core.pending.count(), 0);
    }

    #[tokio::test]
    async fn an_activation_failure_is_ignored_without_systemd_activation() {
        let bus = bus();
        let (caller, systemd) = (connect(&bus), connect(&bus));
        take_name(&bus, &systemd, SYSTEMD);
        bus.handle(caller.id, call(&caller, SVC, "Work", 8, &()));
        let body = ("svc.service", "com.example.Nope", "Computer says no");
        bus.handle(systemd.id, activation_failure(&systemd, &body));
        assert!(drain(&caller).is_empty());
        assert_eq!(bus.lock().core.pending.count(), 1);
    }

    #[tokio::test]
    async fn busvisor_events_reach_only_monitors_that_ask_for_them() {
        let bus = bus();
        let (all, wildcard, asking) = (connect(&bus), connect(&bus), connect(&bus));
        become_monitor(&bus, &all, &[]);
        become_monitor(&bus, &wildcard, &["", "eavesdrop=true"]);
        become_monitor(&bus, &asking, &["sender='org.busvisor.Supervisor1'"]);
        drain(&all);
        drain(&wildcard);
        let body = (1u64, "svc", 0u32);
        let path = names::SUPERVISOR_PATH;
        let ev = crate::wire::signal(path, names::SUPERVISOR_IFACE, "Ready", None, &body);
        bus.lock().core.emit_event(&ev.unwrap());
        // Those that asked for everything see what dbus-daemon would send.
        assert!(drain(&all).is_empty());
        assert!(drain(&wildcard).is_empty());
        assert_eq!(drain(&asking), ["Signal Ready"]);
    }

    #[tokio::test]
    async fn becoming_a_monitor_is_the_same_way_out() {
        let bus = bus();
        let (a, b) = (connect(&bus), connect(&bus));
        bus.handle(
            b.id,
            call(&b, names::BUS_NAME, "RequestName", 2, &(SVC, 0u32)),
        );
        bus.handle(a.id, call(&a, SVC, "Work", 5, &()));
        drain(&b);
        let monitor = Message::method_call(names::BUS_PATH, "BecomeMonitor")
            .sender(unique_name(b.id))
            .destination(names::BUS_NAME)
            .interface(names::IFACE_MONITORING)
            .build(&(Vec::<&str>::new(), 0u32))
            .unwrap();
        bus.handle(b.id, monitor);
        assert_eq!(drain(&a), ["error org.freedesktop.DBus.Error.NoReply"]);
        let g = bus.lock();
        assert_eq!(g.core.names.owner(SVC), None, "its names went");
        assert_eq!(g.core.monitors, [b.id]);
    }

    #[tokio::test]
    async fn update_activation_environment_is_refused_on_a_system_bus() {
        for system in [false, true] {
            let mut bus = bus();
            bus.facts.system_bus = system;
            let a = connect(&bus);
            let vars = HashMap::from([("A", "1")]);
            let uae = Message::method_call(names::BUS_PATH, "UpdateActivationEnvironment")
                .sender(unique_name(a.id))
                .destination(names::BUS_NAME)
                .interface(names::IFACE_DBUS)
                .serial(std::num::NonZeroU32::new(4).unwrap())
                .build(&(vars,))
                .unwrap();
            bus.handle(a.id, uae);
            let mut batch = Vec::new();
            futures_util::FutureExt::now_or_never(a.outbox.next_batch(&mut batch));
            let reply = batch.first().expect("an answer");
            if system {
                assert_eq!(reply.message_type(), Type::Error);
                let h = reply.header();
                assert_eq!(
                    h.error_name().map(|e| e.as_str()),
                    Some("org.freedesktop.DBus.Error.AccessDenied")
                );
                let text: String = reply.body().deserialize().unwrap();
                assert_eq!(
                    text,
                    "Cannot change activation environment on a system bus."
                );
                assert!(bus.lock().sup.env.is_empty());
            } else {
                assert_eq!(reply.message_type(), Type::MethodReturn);
                assert_eq!(bus.lock().sup.env, [("A".to_owned(), "1".to_owned())]);
            }
        }
    }
}
