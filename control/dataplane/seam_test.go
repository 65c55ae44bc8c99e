package dataplane

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/control"
)

// fakeMode records the calls the Dataplane makes; it needs no kernel.
type fakeMode struct {
	name   string
	family Family
	base   string // under(), when set
	log    *[]string
	addErr error
	runs   string // mode Add reports running ("" = itself)
}

func (m fakeMode) Name() string   { return m.name }
func (m fakeMode) Family() Family { return m.family }

func (m fakeMode) Add(ctx context.Context, sb *Sandbox, ep control.Endpoint, fresh bool) (*State, error) {
	*m.log = append(*m.log, "add "+m.name)
	if m.addErr != nil {
		return nil, m.addErr
	}
	st := running(m)
	if m.runs != "" {
		st.mode = m.runs
	}
	return st, nil
}

func (m fakeMode) Remove(ctx context.Context, sb *Sandbox, ep control.Endpoint) error {
	*m.log = append(*m.log, "remove "+m.name)
	return nil
}

func (m fakeMode) Stats(ctx context.Context, sb *Sandbox, ep control.Endpoint) (control.EndpointStats, error) {
	*m.log = append(*m.log, "stats "+m.name)
	return control.EndpointStats{}, nil
}

type layeredFake struct{ fakeMode }

func (m layeredFake) under() []string { return []string{m.base} }

// TestModeDispatch drives the Dataplane's dispatch through fake modes: an add removes the
// leftovers of the other modes of its family (not those it runs on), a delete removes what
// every mode of the endpoint's family may have left and nothing of another family, Stats asks
// the mode that runs, and unknown modes and slots are refused before any mode is called.
func TestModeDispatch(t *testing.T) {
	var calls []string
	a := fakeMode{name: "a", family: FamilySandbox, log: &calls}
	b := layeredFake{fakeMode{name: "b", family: FamilySandbox, base: "a", log: &calls, runs: "a"}}
	c := fakeMode{name: "c", family: FamilySandbox, log: &calls}
	n := fakeMode{name: "n", family: FamilyNode, log: &calls}
	saved := registry
	registry = []Mode{a, b, c, n}
	t.Cleanup(func() { registry = saved })

	d := &Dataplane{log: slog.Default(), sandboxes: map[string]*Sandbox{}}
	d.sandboxes["sb"] = &Sandbox{dp: d}
	ctx := context.Background()
	ep := control.Endpoint{Sandbox: "sb", NIC: "eth0", Slot: 1}
	step := func(name string, fn func() error, want ...string) {
		t.Helper()
		calls = nil
		if err := fn(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if diff := cmp.Diff(want, calls); diff != "" {
			t.Errorf("%s: calls (-want +got):\n%s", name, diff)
		}
	}

	ep.Mode = "a"
	step("add a", func() error { return d.AddEndpoint(ctx, ep) }, "add a", "remove b", "remove c")
	// b runs on a (and here falls back to it): a's plumbing stays.
	ep.Mode = "b"
	step("update to b", func() error { return d.UpdateEndpoint(ctx, ep) }, "add b", "remove c")
	if mode, _, err := d.Mode(ep); err != nil || mode != "a" {
		t.Errorf("Mode after b fell back = %q, %v; want a", mode, err)
	}
	step("stats", func() error { _, err := d.Stats(ctx, ep); return err }, "stats a")
	step("del", func() error { return d.DelEndpoint(ctx, ep) }, "remove a", "remove b", "remove c")
	// Unknown to this process (a restart): ep.Mode picks the family, every member cleans up.
	ep.Mode = "c"
	step("del unknown", func() error { return d.DelEndpoint(ctx, ep) }, "remove a", "remove b", "remove c")
	ep.Mode = "n"
	step("stats unknown", func() error { _, err := d.Stats(ctx, ep); return err }, "stats n")
	step("del node", func() error { return d.DelEndpoint(ctx, ep) }, "remove n")

	calls = nil
	ep.Mode = "netkit"
	if err := d.AddEndpoint(ctx, ep); !errors.Is(err, ErrMode) {
		t.Errorf("add in an unknown mode: %v, want ErrMode", err)
	}
	ep.Mode, ep.Slot = "a", 1000
	if err := d.AddEndpoint(ctx, ep); err == nil {
		t.Error("add with slot 1000 accepted")
	}
	ep.Slot, ep.Sandbox = 1, "nosuch"
	if err := d.AddEndpoint(ctx, ep); !errors.Is(err, ErrNoSandbox) {
		t.Errorf("add to an unknown sandbox: %v, want ErrNoSandbox", err)
	}
	if len(calls) != 0 {
		t.Errorf("modes called for refused requests: %v", calls)
	}
	// A failed add records nothing and removes nothing.
	c.addErr = errors.New("boom")
	registry = []Mode{a, b, c, n}
	ep.Sandbox, ep.Mode = "sb", "c"
	if err := d.AddEndpoint(ctx, ep); err == nil || !slices.Equal(calls, []string{"add c"}) {
		t.Errorf("failed add: err %v, calls %v", err, calls)
	}
	if _, _, err := d.Mode(ep); err == nil {
		t.Error("a failed add left a state")
	}
}

// TestCleanupConnsNoSandbox: CleanupConns of a sandbox never loaded, or one closed meanwhile,
// is ErrNoSandbox, wrapped with the sandbox's name like its other errors.
func TestCleanupConnsNoSandbox(t *testing.T) {
	d := &Dataplane{log: slog.Default(), sandboxes: map[string]*Sandbox{}}
	d.sandboxes["gone"] = &Sandbox{dp: d, closed: true}
	for _, id := range []string{"nosuch", "gone"} {
		n, err := d.CleanupConns(context.Background(), id, netip.MustParseAddr("10.0.0.1"), 6)
		if !errors.Is(err, ErrNoSandbox) || n != 0 {
			t.Errorf("CleanupConns of %s = %d, %v; want 0, ErrNoSandbox", id, n, err)
		}
		if want := "cleanup of " + id + ": "; err == nil || !strings.HasPrefix(err.Error(), want) {
			t.Errorf("CleanupConns of %s: error %q, want it to start with %q", id, err, want)
		}
	}
}
