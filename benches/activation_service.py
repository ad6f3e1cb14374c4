"""Trivial bus-activated service for benches/activation.rs (python variant).

    python3 benches/activation_service.py BUS_NAME

Connects to DBUS_STARTER_ADDRESS with services.d/minibus.py, takes BUS_NAME,
answers one org.example.Bench.Pid() -> u (its own pid) and exits right after
the reply, so that every call of the benchmark is a cold start.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "services.d"))

import minibus  # noqa: E402

obj = minibus.Object("/org/example/Bench", "org.example.Bench")


@obj.method("", "u")
def Pid():
    minibus.exit_after_reply(0)
    return os.getpid()


minibus.serve(sys.argv[1] if len(sys.argv) > 1 else "org.example.BenchPy", obj)
