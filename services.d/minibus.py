"""minibus: a tiny D-Bus service library on the Python standard library only.

Enough of the D-Bus wire protocol to write a bus-activated service:

* connect to the address in DBUS_STARTER_ADDRESS (or DBUS_SESSION_BUS_ADDRESS):
  ``unix:path=...`` or ``unix:abstract=...``;
* authenticate with SASL EXTERNAL (the uid, hex-encoded);
* Hello, RequestName;
* read messages (little or big endian), answer method calls with a method
  return or an error; Introspectable.Introspect and Peer.Ping/GetMachineId
  are answered for every object.

Usage::

    import minibus
    obj = minibus.Object("/org/example/Thing", "org.example.Thing")

    @obj.method("s", "s")
    def Echo(text):
        return text

    minibus.serve("org.example.Thing", obj)

A handler returns the value for a one-type out signature, a tuple for a
longer one, or None for none; it may raise ``minibus.DBusError(name, text)``.
"""

import os
import socket
import struct
import sys
import urllib.parse

# Message types and header field codes (D-Bus specification, "Message Format").
METHOD_CALL, METHOD_RETURN, ERROR, SIGNAL = 1, 2, 3, 4
NO_REPLY_EXPECTED = 0x1
F_PATH, F_INTERFACE, F_MEMBER, F_ERROR_NAME = 1, 2, 3, 4
F_REPLY_SERIAL, F_DESTINATION, F_SENDER, F_SIGNATURE = 5, 6, 7, 8

# Fixed-size types: struct format and alignment (= size).
_FIXED = {"y": "B", "b": "I", "n": "h", "q": "H", "i": "i", "u": "I",
          "x": "q", "t": "Q", "d": "d", "h": "I"}
_ALIGN = {"y": 1, "g": 1, "v": 1, "n": 2, "q": 2, "b": 4, "i": 4, "u": 4,
          "h": 4, "s": 4, "o": 4, "a": 4, "x": 8, "t": 8, "d": 8,
          "(": 8, "{": 8}


_exit_after_reply = None


def exit_after_reply(code=0):
    """Called from a handler: exit with code once its reply is sent."""
    global _exit_after_reply
    _exit_after_reply = code


class DBusError(Exception):
    """Raised by a handler to answer with a D-Bus error."""

    def __init__(self, name, text=""):
        super().__init__(f"{name}: {text}")
        self.name, self.text = name, text


def split_signature(sig):
    """Split a signature into its complete types: "sa{sv}i" -> ["s", "a{sv}", "i"]."""
    out, i = [], 0
    while i < len(sig):
        j = _type_end(sig, i)
        out.append(sig[i:j])
        i = j
    return out


def _type_end(sig, i):
    """Index just past the complete type starting at sig[i]."""
    c = sig[i]
    if c == "a":
        return _type_end(sig, i + 1)
    if c in "({":
        close = ")" if c == "(" else "}"
        i += 1
        while sig[i] != close:
            i = _type_end(sig, i)
        return i + 1
    return i + 1


class _Reader:
    """Unmarshals values from a buffer; offsets count from the message start."""

    def __init__(self, data, big_endian, pos=0):
        self.data, self.pos = data, pos
        self.e = ">" if big_endian else "<"

    def align(self, n):
        self.pos = (self.pos + n - 1) // n * n

    def _unpack(self, code, size):
        v = struct.unpack_from(self.e + code, self.data, self.pos)[0]
        self.pos += size
        return v

    def read(self, t):
        """Read one value of the complete type t."""
        c = t[0]
        self.align(_ALIGN[c])
        if c in _FIXED:
            v = self._unpack(_FIXED[c], _ALIGN[c])
            return bool(v) if c == "b" else v
        if c in "so":
            n = self._unpack("I", 4)
            s = self.data[self.pos:self.pos + n].decode("utf-8")
            self.pos += n + 1  # the string and its NUL
            return s
        if c == "g":
            n = self._unpack("B", 1)
            s = self.data[self.pos:self.pos + n].decode("ascii")
            self.pos += n + 1
            return s
        if c == "v":
            sig = self.read("g")
            return (sig, self.read(sig))
        if c == "a":
            n = self._unpack("I", 4)
            elem = t[1:]
            self.align(_ALIGN[elem[0]])  # padding before the first element is not counted
            end = self.pos + n
            items = []
            while self.pos < end:
                items.append(self.read(elem))
            return dict(items) if elem[0] == "{" else items
        if c in "({":
            return tuple(self.read(m) for m in split_signature(t[1:-1]))
        raise ValueError(f"unsupported type {t!r}")


class _Writer:
    """Marshals values, little endian."""

    def __init__(self):
        self.buf = bytearray()

    def align(self, n):
        self.buf += b"\0" * (-len(self.buf) % n)

    def write(self, t, v):
        c = t[0]
        self.align(_ALIGN[c])
        if c in _FIXED:
            self.buf += struct.pack("<" + _FIXED[c], v)
        elif c in "so":
            b = v.encode("utf-8")
            self.buf += struct.pack("<I", len(b)) + b + b"\0"
        elif c == "g":
            b = v.encode("ascii")
            self.buf += struct.pack("<B", len(b)) + b + b"\0"
        elif c == "v":
            sig, value = v
            self.write("g", sig)
            self.write(sig, value)
        elif c == "a":
            at = len(self.buf)
            self.buf += b"\0\0\0\0"  # length, patched below
            elem = t[1:]
            self.align(_ALIGN[elem[0]])
            start = len(self.buf)
            for item in (v.items() if elem[0] == "{" else v):
                self.write(elem, item)
            struct.pack_into("<I", self.buf, at, len(self.buf) - start)
        elif c in "({":
            for m, x in zip(split_signature(t[1:-1]), v):
                self.write(m, x)
        else:
            raise ValueError(f"unsupported type {t!r}")


class Message:
    """A received message: type, flags, serial, header fields and body."""

    def __init__(self, mtype, flags, serial, fields, body):
        self.type, self.flags, self.serial = mtype, flags, serial
        self.fields, self.body = fields, body

    path = property(lambda self: self.fields.get(F_PATH))
    interface = property(lambda self: self.fields.get(F_INTERFACE))
    member = property(lambda self: self.fields.get(F_MEMBER))
    sender = property(lambda self: self.fields.get(F_SENDER))
    error_name = property(lambda self: self.fields.get(F_ERROR_NAME))
    reply_serial = property(lambda self: self.fields.get(F_REPLY_SERIAL))
    signature = property(lambda self: self.fields.get(F_SIGNATURE, ""))


def _encode(mtype, serial, fields, signature="", args=(), flags=0):
    """One message's bytes: fields is a list of (code, type, value)."""
    body = _Writer()
    for t, v in zip(split_signature(signature), args):
        body.write(t, v)
    hfields = [(code, (t, v)) for code, t, v in fields]
    if signature:
        hfields.append((F_SIGNATURE, ("g", signature)))
    head = _Writer()
    head.buf += struct.pack("<cBBBII", b"l", mtype, flags, 1, len(body.buf), serial)
    head.write("a(yv)", hfields)
    head.align(8)  # the body starts on an 8-byte boundary
    return bytes(head.buf) + bytes(body.buf)


def parse_address(address):
    """The socket address of the first unix: entry of a D-Bus address."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        kv = dict(p.split("=", 1) for p in params.split(",") if "=" in p)
        if "path" in kv:
            return urllib.parse.unquote(kv["path"])
        if "abstract" in kv:
            return "\0" + urllib.parse.unquote(kv["abstract"])
    raise ValueError(f"no usable unix: address in {address!r}")


class Connection:
    """A blocking connection to a bus."""

    def __init__(self, address=None):
        address = address or os.environ.get("DBUS_STARTER_ADDRESS") \
            or os.environ["DBUS_SESSION_BUS_ADDRESS"]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(parse_address(address))
        self.buf = b""
        self.serial = 0
        self.queue = []  # messages read while waiting for a reply
        self.objects = {}
        self._auth()
        self.unique_name = self.call("org.freedesktop.DBus", "/org/freedesktop/DBus",
                                     "org.freedesktop.DBus", "Hello")[0]

    # -- transport ------------------------------------------------------
    def _auth(self):
        uid_hex = str(os.getuid()).encode().hex()
        self.sock.sendall(b"\0AUTH EXTERNAL " + uid_hex.encode() + b"\r\n")
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("bus closed the connection during authentication")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        if not line.startswith(b"OK "):
            raise ConnectionError(f"authentication refused: {line!r}")
        self.sock.sendall(b"BEGIN\r\n")

    def _read_exact(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("bus closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv(self):
        """Read one message (blocking)."""
        fixed = self._read_exact(16)
        big = fixed[0:1] == b"B"
        if not big and fixed[0:1] != b"l":
            raise ConnectionError(f"bad endianness byte {fixed[0:1]!r}")
        e = ">" if big else "<"
        mtype, flags, _version = fixed[1], fixed[2], fixed[3]
        body_len, serial, fields_len = struct.unpack(e + "III", fixed[4:16])
        header_len = 16 + fields_len
        header_len += -header_len % 8
        data = fixed + self._read_exact(header_len - 16 + body_len)
        r = _Reader(data, big, 12)
        fields = {code: value for code, (_sig, value) in r.read("a(yv)")}
        sig = fields.get(F_SIGNATURE, "")
        r = _Reader(data[header_len:], big)  # body alignment counts from its start
        body = [r.read(t) for t in split_signature(sig)]
        return Message(mtype, flags, serial, fields, body)

    def send(self, mtype, fields, signature="", args=(), flags=0):
        self.serial += 1
        self.sock.sendall(_encode(mtype, self.serial, fields, signature, args, flags))
        return self.serial

    # -- calling --------------------------------------------------------
    def call(self, dest, path, interface, member, signature="", args=()):
        """Call a method and wait for its reply; returns the reply's body."""
        serial = self.send(METHOD_CALL, [(F_PATH, "o", path), (F_INTERFACE, "s", interface),
                                         (F_MEMBER, "s", member), (F_DESTINATION, "s", dest)],
                           signature, args)
        while True:
            m = self.recv()
            if m.type in (METHOD_RETURN, ERROR) and m.reply_serial == serial:
                if m.type == ERROR:
                    raise DBusError(m.error_name, m.body[0] if m.body else "")
                return m.body
            self.queue.append(m)

    def request_name(self, name, flags=0x4):
        """RequestName (DO_NOT_QUEUE by default); True if now the primary owner."""
        r = self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                      "RequestName", "su", (name, flags))[0]
        return r in (1, 4)  # PRIMARY_OWNER, ALREADY_OWNER

    def reply(self, call, signature="", args=()):
        self.send(METHOD_RETURN, [(F_REPLY_SERIAL, "u", call.serial),
                                  (F_DESTINATION, "s", call.sender)], signature, args)

    def error(self, call, name, text):
        self.send(ERROR, [(F_REPLY_SERIAL, "u", call.serial), (F_ERROR_NAME, "s", name),
                          (F_DESTINATION, "s", call.sender)], "s", (text,))

    # -- serving --------------------------------------------------------
    def export(self, obj):
        self.objects[obj.path] = obj

    def serve_forever(self):
        """Answer method calls until the bus goes away."""
        while True:
            m = self.queue.pop(0) if self.queue else self.recv()
            if m.type != METHOD_CALL:
                continue  # signals (NameAcquired...) and stray replies
            try:
                sig, result = self._dispatch(m)
            except DBusError as e:
                if not m.flags & NO_REPLY_EXPECTED:
                    self.error(m, e.name, e.text)
                continue
            if not m.flags & NO_REPLY_EXPECTED:
                self.reply(m, sig, result)
            if _exit_after_reply is not None:
                sys.exit(_exit_after_reply)

    def _dispatch(self, m):
        iface, member, path = m.interface, m.member, m.path
        if iface in (None, "org.freedesktop.DBus.Peer") and member == "Ping":
            return "", ()
        if iface in (None, "org.freedesktop.DBus.Peer") and member == "GetMachineId":
            try:
                with open("/etc/machine-id") as f:
                    return "s", (f.read().strip(),)
            except OSError:
                raise DBusError("org.freedesktop.DBus.Error.Failed", "no machine id")
        if iface in (None, "org.freedesktop.DBus.Introspectable") and member == "Introspect":
            return "s", (self._introspect(path),)
        obj = self.objects.get(path)
        if obj is None:
            raise DBusError("org.freedesktop.DBus.Error.UnknownObject", f"No object at {path}")
        if iface not in (None, obj.interface):
            raise DBusError("org.freedesktop.DBus.Error.UnknownInterface",
                            f"No interface {iface} at {path}")
        if member not in obj.methods:
            raise DBusError("org.freedesktop.DBus.Error.UnknownMethod",
                            f"No method {member} in {obj.interface}")
        in_sig, out_sig, fn = obj.methods[member]
        if m.signature != in_sig:
            raise DBusError("org.freedesktop.DBus.Error.InvalidArgs",
                            f"{member} takes ({in_sig}), got ({m.signature})")
        result = fn(*m.body)
        n = len(split_signature(out_sig))
        if n == 0:
            return "", ()
        return out_sig, (result if n > 1 else (result,))

    def _introspect(self, path):
        """XML for path: its interfaces, and child nodes towards exported objects."""
        prefix = path.rstrip("/") + "/"
        children = sorted({p[len(prefix):].split("/")[0] for p in self.objects
                           if p.startswith(prefix) and p != path})
        parts = ['<!DOCTYPE node PUBLIC "-//freedesktop//DTD D-BUS Object Introspection 1.0//EN"'
                 ' "http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd">', "<node>",
                 '  <interface name="org.freedesktop.DBus.Introspectable">'
                 '<method name="Introspect"><arg name="xml" type="s" direction="out"/></method>'
                 "</interface>",
                 '  <interface name="org.freedesktop.DBus.Peer"><method name="Ping"/>'
                 '<method name="GetMachineId"><arg name="id" type="s" direction="out"/></method>'
                 "</interface>"]
        obj = self.objects.get(path)
        if obj is not None:
            parts.append(f'  <interface name="{obj.interface}">')
            for name, (in_sig, out_sig, _fn) in sorted(obj.methods.items()):
                parts.append(f'    <method name="{name}">')
                parts += [f'      <arg type="{t}" direction="in"/>' for t in split_signature(in_sig)]
                parts += [f'      <arg type="{t}" direction="out"/>' for t in split_signature(out_sig)]
                parts.append("    </method>")
            parts.append("  </interface>")
        parts += [f'  <node name="{c}"/>' for c in children]
        parts.append("</node>")
        return "\n".join(parts) + "\n"


class Object:
    """One exported object with one interface of methods."""

    def __init__(self, path, interface):
        self.path, self.interface = path, interface
        self.methods = {}

    def method(self, in_sig="", out_sig=""):
        """Decorator: export fn as a method named after it."""
        def register(fn):
            self.methods[fn.__name__] = (in_sig, out_sig, fn)
            return fn
        return register


def serve(name, *objects, address=None):
    """Connect, export objects, take name, answer calls until the bus goes away."""
    conn = Connection(address)
    for obj in objects:
        conn.export(obj)
    if not conn.request_name(name):
        print(f"minibus: could not take {name}", file=sys.stderr)
        sys.exit(2)
    try:
        conn.serve_forever()
    except ConnectionError:
        pass  # the bus went away: nothing more to serve
    return conn
