package dataplane

// MonitorQueue is how many events a monitor stream holds for its client.
const MonitorQueue = monQueue

// SetLateWriteHook makes fn run in every late write of a restore (writeLate) before anything
// is written, until the returned function is called; an error fn returns fails the write.
func SetLateWriteHook(fn func(sandbox string) error) (unset func()) {
	lateWriteHook = fn
	return func() { lateWriteHook = nil }
}
