"""Example service org.busvisor.Example.Echo: Echo(s) -> s, Pid() -> u, Quit()."""

import os

import minibus

obj = minibus.Object("/org/busvisor/Example/Echo", "org.busvisor.Example.Echo")


@obj.method("s", "s")
def Echo(text):
    return text


@obj.method("", "u")
def Pid():
    return os.getpid()


@obj.method("", "")
def Quit():
    minibus.exit_after_reply(0)


print(f"echo: starting, pid {os.getpid()}", flush=True)
minibus.serve("org.busvisor.Example.Echo", obj)
