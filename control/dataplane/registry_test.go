package dataplane_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/loader"
)

// TestRegistry: the registry offers exactly the modes control validates (users see the same
// names and order in errors and help) and the loader reports kernel requirements for, each
// once, and Lookup finds them ("" = tc).
func TestRegistry(t *testing.T) {
	if got := dataplane.Modes(); !slices.Equal(got, control.Modes) {
		t.Errorf("registry modes %v, control.Modes %v", got, control.Modes)
	}
	if got := dataplane.Modes(); !slices.Equal(got, loader.Modes) {
		t.Errorf("registry modes %v, loader.Modes (kata-dp version's requirements) %v", got, loader.Modes)
	}
	for _, name := range control.Modes {
		m, err := dataplane.Lookup(name)
		if err != nil || m.Name() != name {
			t.Errorf("Lookup(%q) = %v, %v", name, m, err)
		}
	}
	if m, err := dataplane.Lookup(""); err != nil || m.Name() != control.ModeTC {
		t.Errorf(`Lookup("") = %v, %v; want tc`, m, err)
	}
	if _, err := dataplane.Lookup("netkit"); !errors.Is(err, dataplane.ErrMode) {
		t.Errorf(`Lookup("netkit") = %v; want ErrMode`, err)
	}
	for _, m := range append(control.Modes, "", "netkit") {
		want := m == "" || m == control.ModeTC || m == control.ModeXDP
		if got := dataplane.AttachesPrograms(m); got != want {
			t.Errorf("AttachesPrograms(%q) = %v, want %v", m, got, want)
		}
	}
}
