#!/usr/bin/python3
"""A small D-Bus service for busvisor, with GLib's Gio (Debian: python3-gi).

    greeter.py [--double-fork] [NAME]

Object /org/example/Greeter, interface org.example.Greeter:
  Hello(s who) -> s     "Hello, WHO!", and a line on stdout
  Pid() -> u            this process's pid
  Ppid() -> u           its parent's: busvisor's, once it has double-forked

With --double-fork it daemonizes first, as a classic Unix daemon does: the
process busvisor started exits 0, and the grandchild takes the name.
"""

import os
import sys

from gi.repository import Gio, GLib

XML = """
<node>
  <interface name="org.example.Greeter">
    <method name="Hello">
      <arg name="who" type="s" direction="in"/>
      <arg name="greeting" type="s" direction="out"/>
    </method>
    <method name="Pid"><arg name="pid" type="u" direction="out"/></method>
    <method name="Ppid"><arg name="pid" type="u" direction="out"/></method>
  </interface>
</node>
"""


def on_call(conn, sender, path, iface, method, params, invocation):
    if method == "Hello":
        (who,) = params.unpack()
        print(f"greeting {who} for {sender}", flush=True)
        invocation.return_value(GLib.Variant("(s)", (f"Hello, {who}!",)))
    elif method == "Pid":
        invocation.return_value(GLib.Variant("(u)", (os.getpid(),)))
    else:
        invocation.return_value(GLib.Variant("(u)", (os.getppid(),)))


def on_bus(conn, name):
    # The object is there before the name is taken: the message that
    # activated the service is delivered once it is.
    info = Gio.DBusNodeInfo.new_for_xml(XML).interfaces[0]
    conn.register_object("/org/example/Greeter", info, on_call, None, None)


def double_fork():
    if os.fork() > 0:
        os._exit(0)  # busvisor sees exit 0 and waits for the name
    os.setsid()
    if os.fork() > 0:
        os._exit(0)


def main():
    args = sys.argv[1:]
    if args[:1] == ["--double-fork"]:
        args.pop(0)
        double_fork()
    name = args[0] if args else "org.example.Greeter"
    print(f"greeter {name} starting, pid {os.getpid()}", flush=True)
    loop = GLib.MainLoop()
    # STARTER: the bus that started us (DBUS_STARTER_ADDRESS); it is gone,
    # the service goes too.
    Gio.bus_own_name(
        Gio.BusType.STARTER,
        name,
        Gio.BusNameOwnerFlags.NONE,
        on_bus,
        None,
        lambda *_: loop.quit(),
    )
    loop.run()


if __name__ == "__main__":
    main()
