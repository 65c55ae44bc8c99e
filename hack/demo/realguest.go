package main

// realGuestDemo is filled in once the QEMU test guest helpers are wired (control/hotplug/guesttest).
func realGuestDemo(d *demo) error { return errNoGuest }
