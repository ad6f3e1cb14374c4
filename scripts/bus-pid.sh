# Sourced by the bench scripts. bus_pid PID prints the process that does a
# bus's work: busvisor's keeper (the process started, whose pid busvisor
# prints) forks the bus and stays above it, doing nothing but wait (1.2-1.4
# MiB resident, no CPU); dbus-daemon --nofork is its own bus.
bus_pid() {
    local pid=$1 kids
    # shellcheck disable=SC2207 # pids: splitting on spaces is the point
    kids=($(cat "/proc/$pid/task/$pid/children" 2>/dev/null))
    if [ "${#kids[@]}" = 1 ] && [ "$(cat "/proc/${kids[0]}/comm" 2>/dev/null)" = "$(cat "/proc/$pid/comm")" ]; then
        echo "${kids[0]}"
    else
        echo "$pid"
    fi
}
