// Package faultinject lets tests stop the agent at a named step of an operation, to prove that
// a kill -9 at any step converges after a restart (issue 18 item 2).
//
// Product code calls Point at each step; Point does nothing unless a test set Hook. Nothing in
// the agent sets Hook: there is no flag, environment variable or config key for it. The
// cmd/kata-dp tests set it in their TestMain (the test binary doubles as the agent there) to
// kill the process with SIGKILL at the step they name; package tests can make it panic.
package faultinject

// Hook, when set (by tests only), is called with the name of every step reached.
var Hook func(step string)

// Point marks a step: the state is durable up to here and the next action has not started.
func Point(step string) {
	if Hook != nil {
		Hook(step)
	}
}
