"""Example service org.busvisor.Example.Daemon: a classic double-forking daemon.

It forks, the child calls setsid() and forks again, both parents exit 0, and
the grandchild takes the name. Because busvisor is a child subreaper the
daemon is re-parented to busvisor (not to init): Ppid() returns busvisor's
pid, and busvisor reaps it when it exits.
"""

import os
import sys

import minibus

if os.fork() > 0:
    os._exit(0)  # the launcher: busvisor sees exit 0 and waits for the name
os.setsid()
if os.fork() > 0:
    os._exit(0)  # the session leader: the daemon must not reacquire a terminal

obj = minibus.Object("/org/busvisor/Example/Daemon", "org.busvisor.Example.Daemon")


@obj.method("", "u")
def Pid():
    return os.getpid()


@obj.method("", "u")
def Ppid():
    return os.getppid()


@obj.method("", "")
def Quit():
    minibus.exit_after_reply(0)


print(f"daemon: running as pid {os.getpid()}, parent {os.getppid()}", file=sys.stderr, flush=True)
minibus.serve("org.busvisor.Example.Daemon", obj)
