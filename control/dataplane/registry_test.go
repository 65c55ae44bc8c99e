package dataplane_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
)

// TestRegistry: the registry offers exactly the modes control validates (users see the same
// names and order in errors and help), each once, and Lookup finds them ("" = tc).
func TestRegistry(t *testing.T) {
	if got := dataplane.Modes(); !slices.Equal(got, control.Modes) {
		t.Errorf("registry modes %v, control.Modes %v", got, control.Modes)
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
}
