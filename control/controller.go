package control

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/internal/faultinject"
)

// Config holds a Controller's dependencies.
type Config struct {
	Dataplane Dataplane  // required
	Taps      TapManager // required
	Store     StateStore // required
	// Hotplug plugs NICs into VMs; nil makes every sandbox with a QMP socket unhealthy
	// (ErrNoHotplug).
	Hotplug Hotplugger
	// CheckNetNS reports whether path is a usable network namespace; nil uses IsNetNS.
	CheckNetNS func(path string) error
	// CheckVhostSocket reports whether path is an existing unix socket; nil uses IsUnixSocket.
	CheckVhostSocket func(path string) error
	// Logger; nil uses slog.Default().
	Logger *slog.Logger
	// RollbackTimeout bounds the undo of a failed operation; 0 means 30s.
	RollbackTimeout time.Duration
	// OnSandboxRemoved, when set, is called after a sandbox was deleted, so state kept
	// outside the controller for it (e.g. its kata-ipvs rules) goes with it.
	OnSandboxRemoved func(id string)
	// OnSandboxAdded, when set, is called after a sandbox was registered, so node work that
	// watches sandboxes (netmon) starts on it. It must not block.
	OnSandboxAdded func(sb Sandbox)
	// OnSandboxReadopted, when set, is called after RetryUnhealthy re-adopted a sandbox that
	// New could not, so state kept outside the controller for it (its kata-ipvs rules, which
	// could not be pushed while it was down) is pushed now. It runs without the sandbox's lock.
	OnSandboxReadopted func(id string)
	// Now is the clock of RetryUnhealthy's backoff; nil uses time.Now (a seam for tests).
	Now func() time.Time
}

// Controller is the control plane. See the package documentation for its concurrency rules.
type Controller struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex        // guards sandboxes, devices, sockets, and every entry's st pointer
	sandboxes map[string]*entry // by id
	devices   map[string]string // tap name -> sandbox id, reserved or in use
	sockets   map[string]string // vhost-user socket -> sandbox id: one socket serves one NIC
}

// entry is one registered sandbox.
type entry struct {
	mu   sync.Mutex // held for a whole operation on the sandbox
	sb   Sandbox    // immutable
	st   *state     // replaced (under Controller.mu) only by the holder of mu
	gone bool       // removed from the registry; guarded by mu
	// ready is false while AddSandbox has not finished: the entry reserves its id but is not
	// found by lookups. Guarded by Controller.mu.
	ready bool
	// broken is why the agent could not re-adopt the sandbox at start ("" = it could): a
	// broken sandbox is reported unhealthy and refuses every operation but delete, which
	// removes what is left. Set by New; afterwards changed only by RetryUnhealthy, holding
	// both mu and Controller.mu (so either lock is enough to read it).
	broken string
	// down is why the sandbox is unhealthy now by a node task's finding (its VM is gone),
	// "" when it is not; set with SetDown, guarded by Controller.mu. Unlike broken it clears.
	down string
	// retry is set when broken comes from a failed re-adoption (not an unreadable state):
	// RetryUnhealthy tries again at nextTry, backing off after each failure (tries so far).
	retry   bool
	tries   int
	nextTry time.Time
}

// Backoff of RetryUnhealthy: the first retry RetryBackoffMin after the failure, doubling up
// to RetryBackoffMax.
const (
	RetryBackoffMin = 5 * time.Second
	RetryBackoffMax = 5 * time.Minute
)

// state is what is saved of a sandbox, one store key per sandbox.
type state struct {
	Version int             `json:"version"`
	Sandbox Sandbox         `json:"sandbox"`
	NICs    []nic           `json:"nics"`
	Routes  []netspec.Route `json:"routes"`
	// Pending is the sandbox operation under way (pendingAdd, pendingDel), saved before its
	// first action so that an agent killed midway finishes it at the next start: an add is
	// undone, a delete completed.
	Pending string `json:"pending,omitempty"`
}

// The operations an intent (state.Pending, nic.Pending) records.
const (
	pendingAdd = "add"
	pendingDel = "del"
)

// nic is one NIC added through kata-network.
type nic struct {
	Spec       netspec.Interface `json:"spec"` // as printed: pciAddr and Family filled in
	Slot       uint32            `json:"slot"`
	Uplink     string            `json:"uplink,omitempty"`
	TapCreated bool              `json:"tapCreated"`      // created by kata-dp (deleted with the NIC)
	Mode       string            `json:"mode,omitempty"`  // overrides the sandbox's mode
	Vhost      string            `json:"vhost,omitempty"` // overrides the sandbox's vhost-net setting
	// VhostDecision is what vhost-net came to when the NIC was plugged, with the reason.
	VhostDecision string `json:"vhostDecision,omitempty"`
	// Source is where the NIC came from: SourceDiscovery for a pair taken over from Kata,
	// SourceNetmon for a link netmon joined; "" is SourceKataNetwork, as for every NIC saved
	// before sources were kept.
	Source string `json:"source,omitempty"`
	// Pending is the NIC operation under way (pendingAdd, pendingDel), saved before its first
	// action. A NIC still pending when the agent (re)starts, or when the next operation on
	// the sandbox begins, was left halfway by a killed agent: it is removed completely (an
	// add is undone, a delete finished), TapCreated saying whether its tap goes too.
	Pending string `json:"pending,omitempty"`
}

// source returns where n came from.
func (n nic) source() string { return cmp.Or(n.Source, SourceKataNetwork) }

const stateVersion = 1

func (s *state) clone() *state {
	c := *s
	c.NICs = slices.Clone(s.NICs)
	c.Routes = slices.Clone(s.Routes)
	return &c
}

// New builds a Controller from the saved state and re-adopts each sandbox's dataplane
// (EnsureSandbox, then Reconcile when the dataplane implements Reconciler). One bad sandbox
// must not keep the agent (and so every other sandbox) down: a sandbox whose netns is gone or
// whose dataplane cannot be re-adopted is kept, marked unhealthy with the reason (Status,
// Unhealthy, the log) so it can be deleted; a state value that cannot be decoded is moved aside
// (when the store implements StateQuarantiner) and its id kept the same way, so that `sandbox
// del` can still remove its pins. Only a store that cannot be listed at all is an error.
func New(ctx context.Context, cfg Config) (*Controller, error) {
	if cfg.Dataplane == nil || cfg.Taps == nil || cfg.Store == nil {
		return nil, errors.New("new controller: dataplane, taps and store are required")
	}
	if cfg.CheckNetNS == nil {
		cfg.CheckNetNS = IsNetNS
	}
	if cfg.CheckVhostSocket == nil {
		cfg.CheckVhostSocket = IsUnixSocket
	}
	if cfg.RollbackTimeout == 0 {
		cfg.RollbackTimeout = 30 * time.Second
	}
	c := &Controller{
		cfg:       cfg,
		log:       cmp.Or(cfg.Logger, slog.Default()),
		sandboxes: map[string]*entry{},
		devices:   map[string]string{},
		sockets:   map[string]string{},
	}
	saved, unreadable, err := loadState(cfg.Store)
	if err != nil {
		return nil, fmt.Errorf("new controller: load state: %w", err)
	}
	for key, rerr := range unreadable {
		c.quarantine(key, rerr)
	}
	for key, b := range saved {
		st, err := decodeState(key, b)
		if err != nil {
			c.quarantine(key, err)
			continue
		}
		if st.Pending == pendingAdd {
			// Killed while adding the sandbox: undo it, the retried add starts clean.
			if err := c.undoSandboxAdd(ctx, key); err == nil {
				continue
			} else {
				c.log.Error("cannot undo an interrupted sandbox add", "sandbox", key, "err", err)
			}
		}
		c.sandboxes[key] = &entry{sb: st.Sandbox, st: st, ready: true}
		for _, n := range st.NICs {
			c.devices[n.Spec.Device] = key
			if n.Spec.VhostUserSocket != "" {
				c.sockets[n.Spec.VhostUserSocket] = key
			}
		}
	}
	for _, id := range slices.Sorted(maps.Keys(c.sandboxes)) {
		e := c.sandboxes[id]
		if e.broken != "" {
			continue
		}
		if e.st.Pending != "" {
			// Killed while deleting the sandbox (or an undo of its add failed above):
			// finish removing it.
			if err := c.delSandbox(ctx, e); err != nil {
				e.broken = "interrupted " + e.st.Pending + ": " + err.Error()
				c.log.Error("sandbox unhealthy: cannot finish removing it; it can only be deleted", "sandbox", id, "err", err)
			}
			continue
		}
		if err := c.readopt(ctx, e); err != nil {
			e.broken = "re-adopt: " + err.Error()
			e.retry, e.tries, e.nextTry = true, 1, c.now().Add(RetryBackoffMin)
			c.log.Error("sandbox unhealthy: cannot re-adopt it; retried in the background, or it can be deleted", "sandbox", id, "err", err)
		}
	}
	return c, nil
}

func (c *Controller) now() time.Time {
	if c.cfg.Now != nil {
		return c.cfg.Now()
	}
	return time.Now()
}

// RetryUnhealthy tries again to re-adopt each sandbox New could not re-adopt (its netns or
// its QMP socket came back late, a transient dataplane error), when its backoff is due: a
// sandbox that succeeds is healthy again; one that fails waits twice as long (up to
// RetryBackoffMax). The agent runs it periodically (a control/watch task). It returns the
// errors of the sandboxes that failed again.
func (c *Controller) RetryUnhealthy(ctx context.Context) error {
	c.mu.Lock()
	var due []*entry
	for _, e := range c.sandboxes {
		if e.retry && !c.now().Before(e.nextTry) {
			due = append(due, e)
		}
	}
	c.mu.Unlock()
	var errs []error
	for _, e := range due {
		e.mu.Lock()
		if e.gone || !e.retry {
			e.mu.Unlock()
			continue
		}
		err := c.readopt(ctx, e)
		c.mu.Lock()
		if err == nil {
			e.broken, e.retry, e.tries = "", false, 0
		} else {
			e.broken = "re-adopt: " + err.Error()
			e.nextTry = c.now().Add(min(RetryBackoffMin<<min(e.tries, 16), RetryBackoffMax))
			e.tries++
		}
		c.mu.Unlock()
		e.mu.Unlock()
		if err != nil {
			errs = append(errs, fmt.Errorf("sandbox %s: %w", e.sb.ID, err))
		} else {
			c.log.Info("sandbox healthy again: re-adopted", "sandbox", e.sb.ID)
			if c.cfg.OnSandboxReadopted != nil {
				c.cfg.OnSandboxReadopted(e.sb.ID)
			}
		}
	}
	return errors.Join(errs...)
}

// loadState reads every saved state. With a store that lists its keys (StateLister) each
// value is read on its own, so that one that cannot be read (an I/O error) is reported in
// unreadable instead of failing the whole load.
func loadState(s StateStore) (saved map[string][]byte, unreadable map[string]error, err error) {
	l, ok := s.(StateLister)
	if !ok {
		saved, err = s.Load()
		return saved, nil, err
	}
	keys, err := l.Keys()
	if err != nil {
		return nil, nil, err
	}
	saved, unreadable = map[string][]byte{}, map[string]error{}
	for _, k := range keys {
		b, err := l.Get(k)
		if err != nil {
			unreadable[k] = err
			continue
		}
		saved[k] = b
	}
	return saved, unreadable, nil
}

// decodeState parses the saved state of sandbox key.
func decodeState(key string, b []byte) (*state, error) {
	var st state
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, err
	}
	if st.Version != stateVersion || st.Sandbox.ID != key {
		return nil, fmt.Errorf("version %d, id %q: not a state this agent understands", st.Version, st.Sandbox.ID)
	}
	return &st, nil
}

// quarantine handles a state value New cannot decode: it moves the value aside so the next
// start does not trip over it again, logs it, and registers a placeholder sandbox of that id
// marked unhealthy, so status shows the problem and `sandbox del` removes the sandbox's pins.
func (c *Controller) quarantine(key string, cause error) {
	reason := fmt.Sprintf("state unreadable: %v", cause)
	if q, ok := c.cfg.Store.(StateQuarantiner); ok {
		if to, err := q.MoveAside(key); err != nil {
			reason += fmt.Sprintf("; could not move it aside: %v", err)
		} else {
			reason += "; moved to " + to
		}
	}
	c.log.Error("sandbox unhealthy: its saved state cannot be read; it can only be deleted", "sandbox", key, "err", reason)
	if ValidSandboxID(key) != nil {
		return // not a sandbox id: nothing of a sandbox to remove
	}
	sb := Sandbox{ID: key}
	c.sandboxes[key] = &entry{sb: sb, st: &state{Version: stateVersion, Sandbox: sb, NICs: []nic{}, Routes: []netspec.Route{}},
		ready: true, broken: reason}
}

func (c *Controller) readopt(ctx context.Context, e *entry) error {
	if err := c.cfg.CheckNetNS(e.sb.NetNS); err != nil {
		return fmt.Errorf("netns %s: %w", e.sb.NetNS, err)
	}
	if err := c.cfg.Dataplane.EnsureSandbox(ctx, e.sb.ID, e.sb.NetNS); err != nil {
		return fmt.Errorf("ensure dataplane: %w", err)
	}
	if err := c.resolvePending(ctx, e); err != nil {
		// Not fatal: the sandbox works without the NIC, and the next operation on the
		// sandbox tries again (acquire).
		c.log.Warn("cannot finish an interrupted NIC operation yet", "sandbox", e.sb.ID, "err", err)
	}
	if r, ok := c.cfg.Dataplane.(Reconciler); ok {
		var eps []Endpoint
		for _, n := range e.st.NICs {
			if n.Pending == "" {
				eps = append(eps, e.sb.endpoint(n))
			}
		}
		if err := r.Reconcile(ctx, e.sb, eps, programmed(e.st)); err != nil {
			return fmt.Errorf("reconcile dataplane: %w", err)
		}
	}
	c.log.Info("re-adopted sandbox", "sandbox", e.sb.ID, "nics", len(e.st.NICs), "routes", len(e.st.Routes))
	return nil
}

// endpoint is the dataplane's view of a NIC of the sandbox.
func (sb Sandbox) endpoint(n nic) Endpoint {
	mac, _ := net.ParseMAC(n.Spec.HwAddr)
	ep := Endpoint{
		Sandbox: sb.ID, NetNS: sb.NetNS, Slot: n.Slot, NIC: n.Spec.Name, Tap: n.Spec.Device,
		Uplink: n.Uplink, MAC: mac, MTU: n.Spec.MTU, Queues: max(n.Spec.Queues, 1),
		Mode: sb.Mode, AntiSpoof: sb.AntiSpoof, StrictEgress: sb.StrictEgress,
	}
	if n.Mode != "" {
		ep.Mode = n.Mode
	}
	ep.Vhost = cmp.Or(n.Vhost, sb.Vhost) // "" = auto
	if n.Spec.VhostUserSocket != "" {
		ep.Mode, ep.VhostUserSocket, ep.Tap, ep.Uplink = ModeVhostUser, n.Spec.VhostUserSocket, "", ""
	}
	for _, a := range n.Spec.IPAddresses {
		p, fam, err := netspec.ParseIPAddress(a)
		switch {
		case err != nil:
		case fam == netspec.FamilyIPv4:
			ep.Addr = p
		case p.Addr().IsLinkLocalUnicast():
			ep.LinkLocal = p.Addr()
		default:
			ep.Addr6 = p
		}
	}
	return ep
}

// programmed returns the routes of st the dataplane holds: routes on a NIC (not "lo").
func programmed(st *state) []Route {
	slots := map[string]uint32{}
	for _, n := range st.NICs {
		slots[n.Spec.Name] = n.Slot
	}
	out := []Route{}
	for _, r := range st.Routes {
		pr, err := netspec.ValidateRoute(r)
		if err != nil {
			continue
		}
		slot, ok := slots[r.Device]
		if !ok {
			continue
		}
		out = append(out, Route{Slot: slot, Dest: pr.Dest, Gateway: pr.Gateway})
	}
	return out
}

// idRE checks the characters of a sandbox id; the length is checked apart (as loader does), as
// a bounded repetition ({0,127}) compiles into one copy of the class per repetition:
// milliseconds at the start of every kata-dp process, the CLI's included.
var idRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

// ValidSandboxID checks a sandbox id: 1..128 characters, letters, digits, '_', '.', '-', not
// starting with a punctuation character (ids name files and bpffs directories).
func ValidSandboxID(id string) error {
	if len(id) > 128 || !idRE.MatchString(id) {
		return fmt.Errorf("%w: sandbox id %q must be 1..128 letters, digits, '_', '.', '-' starting with a letter or digit", ErrInvalid, id)
	}
	return nil
}

// AddSandbox validates and registers a sandbox and prepares its dataplane.
func (c *Controller) AddSandbox(ctx context.Context, spec SandboxSpec) (Sandbox, error) {
	sb, err := c.validateSandbox(spec)
	if err != nil {
		return Sandbox{}, fmt.Errorf("add sandbox: %w", err)
	}
	e := &entry{sb: sb, st: &state{Version: stateVersion, Sandbox: sb, NICs: []nic{}, Routes: []netspec.Route{}}}
	e.mu.Lock()
	defer e.mu.Unlock()
	c.mu.Lock()
	if _, ok := c.sandboxes[sb.ID]; ok {
		c.mu.Unlock()
		return Sandbox{}, fmt.Errorf("add sandbox: %w: sandbox %s", ErrExists, sb.ID)
	}
	c.sandboxes[sb.ID] = e // held locked until registered or given up
	c.mu.Unlock()
	giveUp := func() {
		e.gone = true
		c.mu.Lock()
		delete(c.sandboxes, sb.ID)
		c.mu.Unlock()
	}
	// The intent first: an agent killed from here on undoes the add at its next start.
	intent := e.st.clone()
	intent.Pending = pendingAdd
	if err := c.save(intent); err != nil {
		giveUp()
		return Sandbox{}, fmt.Errorf("add sandbox %s: %w", sb.ID, err)
	}
	faultinject.Point("sandbox-add:intent")
	if err := c.cfg.Dataplane.EnsureSandbox(ctx, sb.ID, sb.NetNS); err != nil {
		rctx, cancel := c.rollbackCtx(ctx)
		if rerr := c.undoSandboxAdd(rctx, sb.ID); rerr != nil {
			err = fmt.Errorf("%w (rollback: %v)", err, rerr)
		}
		cancel()
		giveUp()
		return Sandbox{}, fmt.Errorf("add sandbox %s: dataplane: %w", sb.ID, err)
	}
	faultinject.Point("sandbox-add:dataplane")
	if err := c.save(e.st); err != nil {
		rctx, cancel := c.rollbackCtx(ctx)
		if rerr := c.undoSandboxAdd(rctx, sb.ID); rerr != nil {
			err = fmt.Errorf("%w (rollback: %v)", err, rerr)
		}
		cancel()
		giveUp()
		return Sandbox{}, fmt.Errorf("add sandbox %s: %w", sb.ID, err)
	}
	c.mu.Lock()
	e.ready = true
	c.mu.Unlock()
	if c.cfg.OnSandboxAdded != nil {
		c.cfg.OnSandboxAdded(sb)
	}
	c.log.Info("sandbox added", "sandbox", sb.ID, "netns", sb.NetNS, "qmp", sb.QMP, "uplink", sb.Uplink, "mode", sb.Mode, "netmon", sb.Netmon)
	return sb, nil
}

func (c *Controller) validateSandbox(spec SandboxSpec) (Sandbox, error) {
	if err := ValidSandboxID(spec.ID); err != nil {
		return Sandbox{}, err
	}
	sb := Sandbox{
		ID: spec.ID, NetNS: spec.NetNS, QMP: spec.QMP,
		Uplink: cmp.Or(spec.Uplink, DefaultUplink), Mode: cmp.Or(spec.Mode, ModeTC),
		AntiSpoof: spec.AntiSpoof == nil || *spec.AntiSpoof, StrictEgress: spec.StrictEgress == nil || *spec.StrictEgress,
		Vhost: spec.Vhost, Source: spec.Source, NoHotplug: spec.NoHotplug, Netmon: spec.Netmon,
	}
	if sb.Vhost == VhostAuto {
		sb.Vhost = "" // the default, kept as before the setting existed
	}
	if sb.Vhost != "" && !slices.Contains(VhostModes, sb.Vhost) {
		return Sandbox{}, fmt.Errorf("%w: vhost %q is not one of %s", ErrInvalid, sb.Vhost, strings.Join(VhostModes, ", "))
	}
	if sb.NetNS == "" && sb.Mode == ModeDirect {
		// Direct mode's taps live beside a host uplink: by default in the agent's own netns.
		sb.NetNS = DirectDefaultNetNS
	}
	if sb.NetNS == "" {
		return Sandbox{}, fmt.Errorf("%w: netns path is required", ErrInvalid)
	}
	if !filepath.IsAbs(sb.NetNS) {
		return Sandbox{}, fmt.Errorf("%w: netns path %q is not absolute", ErrInvalid, sb.NetNS)
	}
	if err := c.cfg.CheckNetNS(sb.NetNS); err != nil {
		return Sandbox{}, fmt.Errorf("%w: netns %s: %v", ErrInvalid, sb.NetNS, err)
	}
	if sb.QMP != "" && !filepath.IsAbs(sb.QMP) {
		return Sandbox{}, fmt.Errorf("%w: qmp socket path %q is not absolute", ErrInvalid, sb.QMP)
	}
	if err := netspec.ValidName("uplink", sb.Uplink); err != nil {
		return Sandbox{}, err
	}
	if !slices.Contains(Modes, sb.Mode) {
		return Sandbox{}, fmt.Errorf("%w: mode %q is not one of %s", ErrInvalid, sb.Mode, strings.Join(Modes, ", "))
	}
	if sb.Netmon && sb.Mode == ModeDirect {
		// A direct sandbox's netns is the host's (or the uplink's): every link there is the
		// node's, none is a network attached to the sandbox.
		return Sandbox{}, fmt.Errorf("%w: netmon does not apply to mode direct (its netns holds the host's links, not the sandbox's)", ErrInvalid)
	}
	return sb, nil
}

// DelSandbox removes a sandbox and everything kata-dp created for it: its endpoints, the taps
// it created, its dataplane and its state. The id must match exactly: a prefix that was
// unique a moment ago may name another sandbox once the intended one is gone (`del web` must
// never remove web-2). The VM is not touched (the sandbox is being torn down), and a sandbox
// whose netns is already gone (or that could not be re-adopted) is removed without touching
// its endpoints (they went with the netns). When a step fails the state is kept and the call
// can be repeated.
func (c *Controller) DelSandbox(ctx context.Context, id string) error {
	e, err := c.lockExact(id)
	if err != nil {
		return fmt.Errorf("del sandbox: %w", err)
	}
	defer e.mu.Unlock()
	if e.st.Pending != pendingDel && e.broken == "" {
		// The intent first: an agent killed from here on finishes the delete at its next
		// start. (A broken sandbox may have no state that can be written back.)
		intent := e.st.clone()
		intent.Pending = pendingDel
		if err := c.commit(e, intent); err != nil {
			return fmt.Errorf("del sandbox %s: %w", e.sb.ID, err)
		}
	}
	faultinject.Point("sandbox-del:intent")
	return c.delSandbox(ctx, e)
}

// undoSandboxAdd removes what an add of sandbox id may have created (its dataplane, its
// state): after a failed add, or at start for an add the agent was killed in.
func (c *Controller) undoSandboxAdd(ctx context.Context, id string) error {
	if err := c.cfg.Dataplane.RemoveSandbox(ctx, id); err != nil {
		return fmt.Errorf("remove dataplane: %w", err)
	}
	if err := c.cfg.Store.Delete(id); err != nil {
		return fmt.Errorf("delete state: %w", err)
	}
	return nil
}

// delSandbox removes sandbox e, registered and locked (or not yet visible, from New).
func (c *Controller) delSandbox(ctx context.Context, e *entry) error {
	var errs []error
	// When the netns is gone its taps went with it and nothing is attached any more: only the
	// sandbox's pins and state remain to be removed.
	nsGone := e.broken != "" || c.cfg.CheckNetNS(e.sb.NetNS) != nil
	for _, n := range slices.Backward(e.st.NICs) {
		if nsGone {
			break
		}
		ep := e.sb.endpoint(n)
		if err := c.cfg.Dataplane.DelEndpoint(ctx, ep); err != nil {
			errs = append(errs, fmt.Errorf("dataplane: del endpoint %s: %w", n.Spec.Name, err))
		}
		if n.TapCreated {
			if err := c.cfg.Taps.DeleteTap(ctx, e.sb.NetNS, n.Spec.Device); err != nil {
				errs = append(errs, fmt.Errorf("delete tap %s: %w", n.Spec.Device, err))
			}
		}
	}
	faultinject.Point("sandbox-del:endpoints")
	if err := c.cfg.Dataplane.RemoveSandbox(ctx, e.sb.ID); err != nil {
		errs = append(errs, fmt.Errorf("dataplane: %w", err))
	}
	if len(errs) > 0 {
		return fmt.Errorf("del sandbox %s: %w", e.sb.ID, errors.Join(errs...))
	}
	faultinject.Point("sandbox-del:dataplane")
	if err := c.cfg.Store.Delete(e.sb.ID); err != nil {
		return fmt.Errorf("del sandbox %s: %w", e.sb.ID, err)
	}
	if f, ok := c.cfg.Hotplug.(SandboxForgetter); ok && e.sb.QMP != "" {
		f.Forget(e.sb) // the monitor connection goes with the sandbox
	}
	c.forget(e)
	c.log.Info("sandbox deleted", "sandbox", e.sb.ID)
	return nil
}

// Sandboxes lists the registered sandboxes by id.
func (c *Controller) Sandboxes() []Sandbox {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]Sandbox, 0, len(c.sandboxes))
	for _, e := range c.sandboxes {
		if e.ready {
			out = append(out, e.sb)
		}
	}
	slices.SortFunc(out, func(a, b Sandbox) int { return strings.Compare(a.ID, b.ID) })
	return out
}

// Lookup finds a sandbox by exact id or unique id prefix.
func (c *Controller) Lookup(id string) (Sandbox, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, err := c.find(id)
	if err != nil {
		return Sandbox{}, err
	}
	return e.sb, nil
}

// find resolves an id or a prefix; c.mu must be held.
func (c *Controller) find(id string) (*entry, error) {
	if e, ok := c.sandboxes[id]; ok && e.ready && id != "" {
		return e, nil
	}
	var found *entry
	n := 0
	if id != "" {
		for k, e := range c.sandboxes {
			if e.ready && strings.HasPrefix(k, id) {
				found = e
				n++
			}
		}
	}
	switch {
	case n == 0:
		return nil, fmt.Errorf("%w (%s)", ErrNoSuchSandbox, id)
	case n > 1:
		return nil, fmt.Errorf("%w (%s)", ErrAmbiguous, id)
	}
	return found, nil
}

// findExact resolves an exact id; c.mu must be held.
func (c *Controller) findExact(id string) (*entry, error) {
	if e, ok := c.sandboxes[id]; ok && e.ready {
		return e, nil
	}
	return nil, fmt.Errorf("%w (%s)", ErrNoSuchSandbox, id)
}

// exactKey marks a context whose operations resolve sandbox ids exactly.
type exactKey struct{}

// WithExactID returns a context under which the controller resolves the sandbox id of an
// operation (kata-network, Health) exactly, never as a prefix: for callers that name sandboxes
// by their full id (the CNI plugin) and must never act on another sandbox whose id merely
// starts with it, e.g. when theirs was removed a moment ago.
func WithExactID(ctx context.Context) context.Context {
	return context.WithValue(ctx, exactKey{}, true)
}

func exactID(ctx context.Context) bool {
	b, _ := ctx.Value(exactKey{}).(bool)
	return b
}

// lock finds a sandbox by id or unique prefix and takes its operation lock.
func (c *Controller) lock(id string) (*entry, error) {
	return c.lockWith(id, c.find)
}

// lockFor is lock, or lockExact when ctx asks for exact ids (WithExactID).
func (c *Controller) lockFor(ctx context.Context, id string) (*entry, error) {
	if exactID(ctx) {
		return c.lockExact(id)
	}
	return c.lock(id)
}

// lockExact finds a sandbox by exact id and takes its operation lock: destructive operations
// use it.
func (c *Controller) lockExact(id string) (*entry, error) {
	return c.lockWith(id, c.findExact)
}

func (c *Controller) lockWith(id string, find func(string) (*entry, error)) (*entry, error) {
	for {
		c.mu.Lock()
		e, err := find(id)
		c.mu.Unlock()
		if err != nil {
			return nil, err
		}
		e.mu.Lock()
		if !e.gone {
			return e, nil
		}
		e.mu.Unlock() // deleted (or never registered) meanwhile: look again
	}
}

// Health checks a sandbox: its netns exists and, when it has a QMP socket, the monitor answers.
func (c *Controller) Health(ctx context.Context, id string) (Sandbox, error) {
	e, err := c.lockFor(ctx, id)
	if err != nil {
		return Sandbox{}, err
	}
	defer e.mu.Unlock()
	return e.sb, c.health(ctx, e)
}

func (c *Controller) health(ctx context.Context, e *entry) error {
	sb := e.sb
	if e.broken != "" {
		return fmt.Errorf("%w: %s: %s", ErrUnhealthy, sb.ID, e.broken)
	}
	if err := c.cfg.CheckNetNS(sb.NetNS); err != nil {
		return fmt.Errorf("%w: %s: netns %s: %v", ErrUnhealthy, sb.ID, sb.NetNS, err)
	}
	if down := c.downReason(e); down != "" {
		return fmt.Errorf("%w: %s: %s", ErrUnhealthy, sb.ID, down)
	}
	if sb.QMP == "" {
		return nil
	}
	if c.cfg.Hotplug == nil {
		return fmt.Errorf("%w: %s: %w", ErrUnhealthy, sb.ID, ErrNoHotplug)
	}
	if err := c.cfg.Hotplug.Healthy(ctx, sb); err != nil {
		return fmt.Errorf("%w: %s: qmp %s: %v", ErrUnhealthy, sb.ID, sb.QMP, err)
	}
	return nil
}

// acquire finds a sandbox, locks it and checks its health: the start of every kata-network
// operation. The caller unlocks e.mu.
func (c *Controller) acquire(ctx context.Context, id string) (*entry, error) {
	e, err := c.lockFor(ctx, id)
	if err != nil {
		return nil, err
	}
	if err := c.health(ctx, e); err != nil {
		e.mu.Unlock()
		return nil, err
	}
	if err := c.resolvePending(ctx, e); err != nil {
		e.mu.Unlock()
		return nil, fmt.Errorf("finish an interrupted operation of sandbox %s first: %w", e.sb.ID, err)
	}
	return e, nil
}

// save writes st durably.
func (c *Controller) save(st *state) error {
	b, err := json.Marshal(st)
	if err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	if err := c.cfg.Store.Put(st.Sandbox.ID, b); err != nil {
		return fmt.Errorf("save state: %w", err)
	}
	return nil
}

// commit saves st and makes it the sandbox's state; e.mu must be held.
func (c *Controller) commit(e *entry, st *state) error {
	if err := c.save(st); err != nil {
		return err
	}
	c.mu.Lock()
	e.st = st
	c.mu.Unlock()
	return nil
}

// rollbackCtx is the context of undo steps: not cancelled with the request (a client that
// hangs up must not leave half a NIC behind), bounded by RollbackTimeout.
func (c *Controller) rollbackCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), c.cfg.RollbackTimeout)
}

// undo is a stack of compensating steps.
type undo struct {
	steps []undoStep
}

type undoStep struct {
	what string
	fn   func(ctx context.Context) error
}

func (u *undo) push(what string, fn func(ctx context.Context) error) {
	u.steps = append(u.steps, undoStep{what, fn})
}

// rollback runs the steps in reverse and returns err with any failure of theirs appended.
func (c *Controller) rollback(ctx context.Context, u *undo, err error) error {
	rctx, cancel := c.rollbackCtx(ctx)
	defer cancel()
	var failed []string
	for _, s := range slices.Backward(u.steps) {
		if rerr := s.fn(rctx); rerr != nil {
			c.log.Error("rollback step failed", "step", s.what, "err", rerr)
			failed = append(failed, fmt.Sprintf("%s: %v", s.what, rerr))
		}
	}
	if len(failed) > 0 {
		return fmt.Errorf("%w (rollback failed: %s)", err, strings.Join(failed, "; "))
	}
	return err
}

// reserveDevice claims a tap name host-wide for sandbox id.
func (c *Controller) reserveDevice(dev, id string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if owner, ok := c.devices[dev]; ok {
		if owner == id {
			return fmt.Errorf("%w: device %s is already used by a NIC of this sandbox", ErrExists, dev)
		}
		return fmt.Errorf("%w: device %s is already used by sandbox %s", ErrExists, dev, owner)
	}
	c.devices[dev] = id
	return nil
}

// reserveSocket claims a vhost-user socket host-wide for sandbox id: a vhost-user switch
// serves one NIC per socket, and a second VM connecting to it would get a mixed-up port.
func (c *Controller) reserveSocket(path, id string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if owner, ok := c.sockets[path]; ok {
		return fmt.Errorf("%w: vhostUserSocket %s is already used by sandbox %s", ErrExists, path, owner)
	}
	c.sockets[path] = id
	return nil
}

func (c *Controller) releaseSocket(path, id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.sockets[path] == id {
		delete(c.sockets, path)
	}
}

func (c *Controller) releaseDevice(dev, id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.devices[dev] == id {
		delete(c.devices, dev)
	}
}

// prefixOf returns the NIC's address of the family (netspec.FamilyIPv4 or FamilyIPv6) as a
// prefix, or the zero prefix.
func prefixOf(n nic, family int) netip.Prefix {
	for _, a := range n.Spec.IPAddresses {
		if p, fam, err := netspec.ParseIPAddress(a); err == nil && fam == family {
			return p
		}
	}
	return netip.Prefix{}
}
