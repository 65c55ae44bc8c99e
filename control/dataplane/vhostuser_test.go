package dataplane_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/dataplane"
)

// TestVhostUserMode: a NIC with a vhostUserSocket runs mode vhost-user, which installs nothing
// and has no counters in kata-dp (the switch has them); users cannot choose it as a mode.
func TestVhostUserMode(t *testing.T) {
	m, err := dataplane.Lookup(control.ModeVhostUser)
	if err != nil || m.Name() != control.ModeVhostUser || m.Family() != dataplane.FamilyVhostUser {
		t.Fatalf("Lookup(vhost-user) = %v, %v", m, err)
	}
	if slices.Contains(dataplane.Modes(), control.ModeVhostUser) {
		t.Errorf("Modes() offers vhost-user: %v", dataplane.Modes())
	}
	ctx := context.Background()
	ep := control.Endpoint{Sandbox: "sb", NIC: "eth-test", Mode: control.ModeVhostUser, VhostUserSocket: "/run/vhost-user1"}
	if _, err := m.Add(ctx, nil, ep, true); err != nil {
		t.Errorf("add: %v", err)
	}
	if err := m.Remove(ctx, nil, ep); err != nil {
		t.Errorf("remove: %v", err)
	}
	if _, err := m.Stats(ctx, nil, ep); !errors.Is(err, control.ErrNoCounters) {
		t.Errorf("stats: %v, want ErrNoCounters", err)
	}
	ep.VhostUserSocket = ""
	if _, err := m.Add(ctx, nil, ep, true); err == nil {
		t.Errorf("add without a socket succeeded")
	}
}
