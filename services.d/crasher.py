"""Example service org.busvisor.Example.Crasher: Crash() exits with status 1
without replying; Ping() -> s answers "pong from PID"; Pid() -> u."""

import os

import minibus

obj = minibus.Object("/org/busvisor/Example/Crasher", "org.busvisor.Example.Crasher")


@obj.method("", "")
def Crash():
    os._exit(1)  # no reply: the caller gets NoReply


@obj.method("", "s")
def Ping():
    return f"pong from {os.getpid()}"


@obj.method("", "u")
def Pid():
    return os.getpid()


print(f"crasher: starting, pid {os.getpid()}", flush=True)
minibus.serve("org.busvisor.Example.Crasher", obj)
