package monitor

import "golang.org/x/sys/unix"

func clockMonotonic(ts *[2]int64) error {
	var t unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &t); err != nil {
		return err
	}
	ts[0], ts[1] = t.Sec, t.Nsec
	return nil
}
