package maps

import "golang.org/x/sys/unix"

// MonotonicNow is the datapath's clock as the control plane reads it: CLOCK_MONOTONIC in ns,
// the clock bpf_ktime_get_ns and the load balancer's coarse lb_now count in. The connection
// table's last_seen, the sweeper's expiry and the monitor's event stamps all compare with it,
// so every reader takes it from here. (CLOCK_MONOTONIC cannot fail on Linux.)
func MonotonicNow() uint64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return uint64(ts.Nano())
}
