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
	for _, name := range dataplane.Modes() {
		objs, err := dataplane.Objects(name)
		if err != nil || !slices.Contains(objs, loader.ObjectDatapath) {
			t.Errorf("Objects(%q) = %v, %v; every sandbox loads the datapath object", name, objs, err)
		}
		if direct := name == control.ModeDirect; direct != slices.Contains(objs, loader.ObjectNode) {
			t.Errorf("Objects(%q) = %v: only direct mode loads the node object", name, objs)
		}
	}
	if _, err := dataplane.Objects("nosuchmode"); !errors.Is(err, dataplane.ErrMode) {
		t.Errorf("Objects of an unknown mode: %v", err)
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
