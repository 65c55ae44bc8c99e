// Package qmp is a small client for the QEMU Machine Protocol over a unix socket.
//
// kata-dp hot-plugs NICs into a sandbox's VM the way Kata's runtime does, so it needs to talk to
// the VM's QMP monitor: run commands (with ids and per-call timeouts through the context), pass
// tap file descriptors with getfd (SCM_RIGHTS), and see asynchronous events such as
// DEVICE_DELETED while commands run.
//
// A Client dials lazily: the first call connects, reads the greeting and negotiates
// capabilities. When the monitor goes away (QEMU restarted or killed) the calls in flight fail
// with ErrDisconnected and the next call dials again; when nothing listens any more, calls fail
// with ErrUnavailable. QMP error replies are returned as *Error (use errors.As).
//
// A hung or hostile monitor cannot wedge the caller: every command is bounded by the Client's
// Timeout (DefaultTimeout, 15 s, unless set) on top of the caller's context, and every message
// read by MaxMessage (DefaultMaxMessage, 4 MiB): a monitor that streams without completing a
// message is dropped with ErrTooLarge (wrapped in ErrDisconnected).
//
// Events are delivered to Subscriptions. Subscribe before issuing the command whose event you
// wait for (for example before device_del): events are queued from the moment Subscribe
// returns, so none can be missed between the command's reply and the wait.
//
// All methods of Client and Subscription are safe for concurrent use. Commands are written in
// call order and QEMU answers them in order.
//
// Package qmptest offers a fake monitor for unit tests of code built on this client.
package qmp
