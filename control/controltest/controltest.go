// Package controltest holds in-memory fakes of control's dependencies (Dataplane,
// Hotplugger, TapManager) for the unit tests of control, control/api and cmd/kata-dp. They
// record what they are asked and program nothing; each has a Fail hook that makes any method
// fail, to test rollbacks. They are safe for concurrent use.
package controltest

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"slices"
	"sync"

	"github.com/kata-dp/kata-dp/control"
)

// MemDataplane is a Dataplane that only records what it is asked to program: endpoints and
// routes per sandbox, in memory. It forwards nothing. It is the fake of control's unit tests and
// of the CLI's golden tests; Fail lets a test make any method fail.
type MemDataplane struct {
	mu        sync.Mutex
	sandboxes map[string]*MemSandbox
	calls     []string
	// Fail, when set, is called before every method with its name ("AddEndpoint", ...) and
	// the sandbox id; a non-nil error is returned instead of doing the work.
	Fail func(method, sandbox string) error
}

// MemSandbox is what a MemDataplane holds for one sandbox.
type MemSandbox struct {
	NetNS     string
	Endpoints map[uint32]control.Endpoint
	Routes    []control.Route
}

// NewMemDataplane returns an empty MemDataplane.
func NewMemDataplane() *MemDataplane {
	return &MemDataplane{sandboxes: map[string]*MemSandbox{}}
}

func (m *MemDataplane) enter(method, sandbox string) error {
	m.calls = append(m.calls, method+" "+sandbox)
	if m.Fail != nil {
		if err := m.Fail(method, sandbox); err != nil {
			return err
		}
	}
	return nil
}

// Calls returns the methods called so far, as "Method sandbox".
func (m *MemDataplane) Calls() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return slices.Clone(m.calls)
}

// Sandbox returns a copy of what is programmed for a sandbox, or nil.
func (m *MemDataplane) Sandbox(id string) *MemSandbox {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, ok := m.sandboxes[id]
	if !ok {
		return nil
	}
	return &MemSandbox{NetNS: s.NetNS, Endpoints: maps.Clone(s.Endpoints), Routes: slices.Clone(s.Routes)}
}

// EnsureSandbox implements control.Dataplane.
func (m *MemDataplane) EnsureSandbox(_ context.Context, id, netns string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.enter("EnsureSandbox", id); err != nil {
		return err
	}
	if _, ok := m.sandboxes[id]; !ok {
		m.sandboxes[id] = &MemSandbox{NetNS: netns, Endpoints: map[uint32]control.Endpoint{}, Routes: []control.Route{}}
	}
	return nil
}

// RemoveSandbox implements control.Dataplane.
func (m *MemDataplane) RemoveSandbox(_ context.Context, id string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.enter("RemoveSandbox", id); err != nil {
		return err
	}
	delete(m.sandboxes, id)
	return nil
}

func (m *MemDataplane) sandbox(id string) (*MemSandbox, error) {
	s, ok := m.sandboxes[id]
	if !ok {
		return nil, fmt.Errorf("mem dataplane: sandbox %s not loaded", id)
	}
	return s, nil
}

// AddEndpoint implements control.Dataplane. Adding a slot twice is an error.
func (m *MemDataplane) AddEndpoint(_ context.Context, ep control.Endpoint) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.enter("AddEndpoint", ep.Sandbox); err != nil {
		return err
	}
	s, err := m.sandbox(ep.Sandbox)
	if err != nil {
		return err
	}
	if _, ok := s.Endpoints[ep.Slot]; ok {
		return fmt.Errorf("mem dataplane: slot %d of %s in use", ep.Slot, ep.Sandbox)
	}
	s.Endpoints[ep.Slot] = ep
	return nil
}

// UpdateEndpoint implements control.EndpointUpdater.
func (m *MemDataplane) UpdateEndpoint(_ context.Context, ep control.Endpoint) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.enter("UpdateEndpoint", ep.Sandbox); err != nil {
		return err
	}
	s, err := m.sandbox(ep.Sandbox)
	if err != nil {
		return err
	}
	if _, ok := s.Endpoints[ep.Slot]; !ok {
		return fmt.Errorf("mem dataplane: slot %d of %s not in use", ep.Slot, ep.Sandbox)
	}
	s.Endpoints[ep.Slot] = ep
	return nil
}

// DelEndpoint implements control.Dataplane. Deleting a missing endpoint is not an error.
func (m *MemDataplane) DelEndpoint(_ context.Context, ep control.Endpoint) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.enter("DelEndpoint", ep.Sandbox); err != nil {
		return err
	}
	if s, ok := m.sandboxes[ep.Sandbox]; ok {
		delete(s.Endpoints, ep.Slot)
	}
	return nil
}

// SetRoutes implements control.Dataplane.
func (m *MemDataplane) SetRoutes(_ context.Context, sandbox string, routes []control.Route) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.enter("SetRoutes", sandbox); err != nil {
		return err
	}
	s, err := m.sandbox(sandbox)
	if err != nil {
		return err
	}
	s.Routes = slices.Clone(routes)
	return nil
}

// Stats implements control.Dataplane: all counters are zero.
func (m *MemDataplane) Stats(_ context.Context, ep control.Endpoint) (control.EndpointStats, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	s, err := m.sandbox(ep.Sandbox)
	if err != nil {
		return control.EndpointStats{}, err
	}
	if _, ok := s.Endpoints[ep.Slot]; !ok {
		return control.EndpointStats{}, fmt.Errorf("mem dataplane: slot %d of %s not in use", ep.Slot, ep.Sandbox)
	}
	return control.EndpointStats{}, nil
}

// MemHotplugger is a Hotplugger that plugs nothing: it hands out PCI addresses "02.0/01",
// "02.0/02", ... "02.0/1f", "03.0/01", ... per sandbox (lowest free) and remembers them.
// Fail lets a test make any method fail.
type MemHotplugger struct {
	mu      sync.Mutex
	plugged map[string]map[int]string // sandbox -> slot -> NIC
	// Fail, when set, is called before every method with its name ("Plug", "Unplug",
	// "Healthy") and the sandbox id.
	Fail func(method, sandbox string) error
}

// NewMemHotplugger returns an empty MemHotplugger.
func NewMemHotplugger() *MemHotplugger {
	return &MemHotplugger{plugged: map[string]map[int]string{}}
}

func (h *MemHotplugger) fail(method, sandbox string) error {
	if h.Fail != nil {
		return h.Fail(method, sandbox)
	}
	return nil
}

// Plugged returns the NICs plugged into a sandbox's VM by slot number (0 is "02.0/01").
func (h *MemHotplugger) Plugged(sandbox string) map[int]string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return maps.Clone(h.plugged[sandbox])
}

// Plug implements control.Hotplugger.
func (h *MemHotplugger) Plug(_ context.Context, sb control.Sandbox, ep control.Endpoint) (string, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.fail("Plug", sb.ID); err != nil {
		return "", err
	}
	p := h.plugged[sb.ID]
	if p == nil {
		p = map[int]string{}
		h.plugged[sb.ID] = p
	}
	for slot := 0; slot < 31*8; slot++ {
		if _, ok := p[slot]; !ok {
			p[slot] = ep.NIC
			return fmt.Sprintf("%02x.0/%02x", 2+slot/31, 1+slot%31), nil
		}
	}
	return "", fmt.Errorf("mem hotplug: no free slot in %s", sb.ID)
}

// Unplug implements control.Hotplugger.
func (h *MemHotplugger) Unplug(_ context.Context, sb control.Sandbox, ep control.Endpoint) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.fail("Unplug", sb.ID); err != nil {
		return err
	}
	for slot, nic := range h.plugged[sb.ID] {
		if nic == ep.NIC {
			delete(h.plugged[sb.ID], slot)
			return nil
		}
	}
	return fmt.Errorf("mem hotplug: %s not plugged into %s", ep.NIC, sb.ID)
}

// Scrub implements control.VMScrubber: the NIC is removed if it is plugged.
func (h *MemHotplugger) Scrub(_ context.Context, sb control.Sandbox, ep control.Endpoint) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if err := h.fail("Scrub", sb.ID); err != nil {
		return err
	}
	for slot, nic := range h.plugged[sb.ID] {
		if nic == ep.NIC {
			delete(h.plugged[sb.ID], slot)
		}
	}
	return nil
}

// Healthy implements control.Hotplugger.
func (h *MemHotplugger) Healthy(_ context.Context, sb control.Sandbox) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.fail("Healthy", sb.ID)
}

// MemTaps is a TapManager over an in-memory set of links per netns, for tests of logic.
type MemTaps struct {
	mu    sync.Mutex
	links map[string]map[string]bool // netns -> link name -> is a tap
	// Fail, when set, is called before every method with its name and the link name.
	Fail func(method, name string) error
}

// NewMemTaps returns a MemTaps with no links.
func NewMemTaps() *MemTaps { return &MemTaps{links: map[string]map[string]bool{}} }

// AddLink makes a link exist (isTap: a tap, otherwise some other kind).
func (m *MemTaps) AddLink(netns, name string, isTap bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.links[netns] == nil {
		m.links[netns] = map[string]bool{}
	}
	m.links[netns][name] = isTap
}

// Links returns the links of a netns by name (value: is a tap).
func (m *MemTaps) Links(netns string) map[string]bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return maps.Clone(m.links[netns])
}

func (m *MemTaps) fail(method, name string) error {
	if m.Fail != nil {
		return m.Fail(method, name)
	}
	return nil
}

// EnsureTap implements control.TapManager.
func (m *MemTaps) EnsureTap(_ context.Context, netns, name string, _ control.TapOptions) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.fail("EnsureTap", name); err != nil {
		return false, err
	}
	if isTap, ok := m.links[netns][name]; ok {
		if !isTap {
			return false, fmt.Errorf("%w: %s", control.ErrNotTap, name)
		}
		return false, nil
	}
	if m.links[netns] == nil {
		m.links[netns] = map[string]bool{}
	}
	m.links[netns][name] = true
	return true, nil
}

// DeleteTap implements control.TapManager.
func (m *MemTaps) DeleteTap(_ context.Context, netns, name string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.fail("DeleteTap", name); err != nil {
		return err
	}
	delete(m.links[netns], name)
	return nil
}

// LinkExists implements control.TapManager.
func (m *MemTaps) LinkExists(_ context.Context, netns, name string) (bool, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.fail("LinkExists", name); err != nil {
		return false, err
	}
	_, ok := m.links[netns][name]
	return ok, nil
}

var (
	_ control.Dataplane       = (*MemDataplane)(nil)
	_ control.EndpointUpdater = (*MemDataplane)(nil)
	_ control.Hotplugger      = (*MemHotplugger)(nil)
	_ control.TapManager      = (*MemTaps)(nil)
)

// SyncBuffer is a bytes.Buffer that is safe for concurrent use: the tests that run an agent or
// a logger in another goroutine (or copy a subprocess's stderr) write to it while the test
// reads it.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

// Write appends p.
func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

// String is everything written so far.
func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
