//! busvisor's own lifecycle events. (Signals come with the control API.)

use std::time::Duration;

use crate::router::State;
use crate::supervision::reaper::ExitKind;

pub fn activation_requested(_st: &mut State, _id: &str, _requester: Option<(String, Option<u32>)>) {
}
pub fn started(_st: &mut State, _id: &str, _pid: i32) {}
pub fn ready(_st: &mut State, _id: &str, _main_pid: Option<i32>) {}
pub fn exited(_st: &mut State, _id: &str, _pid: i32, _kind: ExitKind, _failure: bool) {}
pub fn restarting(_st: &mut State, _id: &str, _attempt: u32, _delay: Duration) {}
pub fn failed(_st: &mut State, _id: &str, _reason: &str) {}
pub fn stopping(_st: &mut State, _id: &str) {}
pub fn stopped(_st: &mut State, _id: &str) {}
pub fn idle_stopped(_st: &mut State, _id: &str) {}
