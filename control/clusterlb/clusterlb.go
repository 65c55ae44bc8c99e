// Package clusterlb keeps two rule tables per sandbox apart and writes their union into the
// sandbox's load balancer: the sandbox's own kata-ipvs table (control/ipvsctl) and the node's
// cluster table (the Kubernetes Services, control/kube), which every sandbox shares.
//
// Tables sits between ipvsctl.Manager and the dataplane and implements the interface the
// manager pushes through (ipvsctl.LB and ipvsctl.ServiceLB), so kata-ipvs commands list,
// save, clear and restore only their own rules; the datapath gets the effective table: the
// kata-ipvs services plus every cluster service whose protocol and VIP:port no kata-ipvs
// service of that sandbox has (kata-ipvs wins, in its sandbox only). Both go through the
// dataplane's per-service atomic switch, so established connections keep their real servers
// whichever table a change comes from, and nothing is written for a service that did not
// change.
//
// After an agent start the pinned datapath still holds the union written by the previous
// process; Tables leaves it alone until the first cluster sync (SetCluster), then rewrites
// every sandbox once, under a new generation (no packet sees a half-written table). The
// kata-ipvs tables reinstalled at start (ipvsctl.New) are only recorded until then.
// kata-ipvs commands that arrive before the first sync wait for it for up to FirstSyncWait;
// after that they are applied with the cluster services known so far (none), and the cluster
// ones come back with the first sync.
//
// A Tables is safe for concurrent use; changes are serialised by one lock.
package clusterlb

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
)

// FirstSyncWait bounds how long a kata-ipvs command waits for the first cluster sync.
const FirstSyncWait = 10 * time.Second

// LB is the dataplane (control/dataplane implements it).
type LB interface {
	ipvsctl.LB
	ipvsctl.ServiceLB
}

// Tables merges the kata-ipvs tables and the cluster table; see the package doc.
type Tables struct {
	lb        LB
	sandboxes func() []string // the sandboxes to serve
	log       *slog.Logger
	wait      time.Duration

	ready    chan struct{} // closed by the first SetCluster
	waitOnce sync.Once
	waited   chan struct{} // closed when commands stop waiting for the first sync

	mu       sync.Mutex
	starting bool // records the reinstalls of ipvsctl.New without pushing them
	kata     map[string]*own
	cluster  map[ipvs.ServiceKey]*ipvs.Service
	shared   *ipvs.Table // the cluster table alone, for sandboxes without kata-ipvs rules
	status   map[string]SandboxStatus
	errors   uint64
}

// own is this package's copy of a sandbox's kata-ipvs table (ipvsctl changes its own in place,
// under its own lock).
type own struct {
	services map[ipvs.ServiceKey]*ipvs.Service
	timeouts ipvs.Timeouts
}

// SandboxStatus is what the cluster table is in one sandbox.
type SandboxStatus struct {
	// Programmed is the number of cluster services in force in the sandbox.
	Programmed int `json:"programmed"`
	// Overridden is the number of cluster services a kata-ipvs service of the sandbox hides.
	Overridden int `json:"overridden"`
	// Err is the last failure to write the sandbox's datapath ("" when the last write worked).
	Err string `json:"error,omitempty"`
}

// New returns Tables writing through lb into the sandboxes that sandboxes lists (the healthy
// sandboxes of the controller). Until Started is called, reinstalls are recorded, not pushed.
func New(lb LB, sandboxes func() []string, log *slog.Logger) *Tables {
	if log == nil {
		log = slog.Default()
	}
	return &Tables{lb: lb, sandboxes: sandboxes, log: log, wait: FirstSyncWait, ready: make(chan struct{}), waited: make(chan struct{}),
		starting: true, kata: map[string]*own{}, status: map[string]SandboxStatus{}}
}

// SetFirstSyncWait changes FirstSyncWait for this Tables (tests).
func (t *Tables) SetFirstSyncWait(d time.Duration) { t.wait = d }

// Started ends the start-up phase: from now on kata-ipvs changes are pushed (after waiting
// for the first cluster sync).
func (t *Tables) Started() {
	t.mu.Lock()
	t.starting = false
	t.mu.Unlock()
}

// Synced reports whether the first cluster sync happened.
func (t *Tables) Synced() bool {
	select {
	case <-t.ready:
		return true
	default:
		return false
	}
}

// waitFirst waits for the first cluster sync, at most the FirstSyncWait of the first call
// (later calls do not wait again once it has run out).
func (t *Tables) waitFirst(ctx context.Context) error {
	select {
	case <-t.ready:
		return nil
	case <-t.waited:
		return nil
	default:
	}
	timer := time.NewTimer(t.wait)
	defer timer.Stop()
	select {
	case <-t.ready:
	case <-t.waited:
	case <-timer.C:
		t.waitOnce.Do(func() {
			t.log.Warn("cluster table: no sync from the API server yet; kata-ipvs rules are applied without the cluster's services until it comes", "waited", t.wait)
			close(t.waited)
		})
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

func ownOf(tb *ipvs.Table) *own {
	o := &own{services: make(map[ipvs.ServiceKey]*ipvs.Service, len(tb.Services)), timeouts: tb.ConnTimeouts}
	for _, s := range tb.Services {
		c := *s
		c.Servers = slices.Clone(s.Servers)
		o.services[s.ServiceKey] = &c
	}
	return o
}

// merged returns the effective table of sandbox id. Called under mu.
func (t *Tables) merged(id string) *ipvs.Table {
	o := t.kata[id]
	if o == nil || (len(o.services) == 0 && o.timeouts == (ipvs.Timeouts{})) {
		if t.shared == nil {
			t.shared = tableOf(t.cluster, nil, ipvs.Timeouts{})
		}
		return t.shared
	}
	return tableOf(t.cluster, o.services, o.timeouts)
}

// tableOf builds the union: every kata service, and the cluster services whose key kata does
// not have. The services are shared, not copied: the dataplane only reads them.
func tableOf(cluster, kata map[ipvs.ServiceKey]*ipvs.Service, to ipvs.Timeouts) *ipvs.Table {
	tb := &ipvs.Table{ConnTimeouts: to, Services: make([]*ipvs.Service, 0, len(cluster)+len(kata))}
	for _, s := range kata {
		tb.Services = append(tb.Services, s)
	}
	for k, s := range cluster {
		if _, ok := kata[k]; !ok {
			tb.Services = append(tb.Services, s)
		}
	}
	tb.Rules() // builds the index now, so concurrent readers never build it
	return tb
}

// SetLB records sandbox id's kata-ipvs table and makes the datapath match the union.
func (t *Tables) SetLB(ctx context.Context, id string, tb *ipvs.Table) error {
	return t.setKata(ctx, id, tb, false)
}

// RestoreLB records sandbox id's kata-ipvs table and switches the datapath to the union at once.
func (t *Tables) RestoreLB(ctx context.Context, id string, tb *ipvs.Table) error {
	return t.setKata(ctx, id, tb, true)
}

func (t *Tables) setKata(ctx context.Context, id string, tb *ipvs.Table, restore bool) error {
	o := ownOf(tb)
	t.mu.Lock()
	if t.starting {
		t.kata[id] = o
		t.mu.Unlock()
		return nil
	}
	t.mu.Unlock()
	if err := t.waitFirst(ctx); err != nil {
		return fmt.Errorf("kata-ipvs: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	push := t.lb.SetLB
	if restore {
		push = t.lb.RestoreLB
	}
	return t.replaceKata(ctx, id, o, push)
}

// replaceKata makes o sandbox id's kata-ipvs table and pushes the union whole; on failure the
// previous table stays recorded. Called under mu.
func (t *Tables) replaceKata(ctx context.Context, id string, o *own, push func(context.Context, string, *ipvs.Table) error) error {
	old, had := t.kata[id]
	t.kata[id] = o
	if err := push(ctx, id, t.merged(id)); err != nil {
		if had {
			t.kata[id] = old
		} else {
			delete(t.kata, id)
		}
		return err
	}
	t.noteOK(id)
	return nil
}

// SetLBService records the change of one kata-ipvs service and writes that key's effective
// service: the kata-ipvs one, or the cluster's when kata-ipvs no longer has one.
func (t *Tables) SetLBService(ctx context.Context, id string, tb *ipvs.Table, k ipvs.ServiceKey) error {
	svc, has := tb.Service(k)
	t.mu.Lock()
	starting := t.starting
	t.mu.Unlock()
	if starting {
		return t.SetLB(ctx, id, tb)
	}
	if err := t.waitFirst(ctx); err != nil {
		return fmt.Errorf("kata-ipvs: %w", err)
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	o := t.kata[id]
	if o == nil {
		o = &own{services: map[ipvs.ServiceKey]*ipvs.Service{}, timeouts: tb.ConnTimeouts}
		t.kata[id] = o
	}
	if o.timeouts != tb.ConnTimeouts {
		// Not a one-service change after all: take the whole table.
		return t.replaceKata(ctx, id, ownOf(tb), t.lb.SetLB)
	}
	prev, hadPrev := o.services[k]
	if has {
		o.services[k] = &svc
	} else {
		delete(o.services, k)
	}
	if err := t.lb.SetLBService(ctx, id, t.merged(id), k); err != nil {
		if hadPrev {
			o.services[k] = prev
		} else {
			delete(o.services, k)
		}
		return err
	}
	t.noteOK(id)
	return nil
}

// LBCounters reads the sandbox's load-balancer counters (kata-ipvs listings read their own
// services' ids from them).
func (t *Tables) LBCounters(ctx context.Context, id string) (ipvs.Counters, error) {
	return t.lb.LBCounters(ctx, id)
}

// CleanupConns deletes the sandbox's connections to dst over proto.
func (t *Tables) CleanupConns(ctx context.Context, id string, dst netip.Addr, proto uint8) (int, error) {
	return t.lb.CleanupConns(ctx, id, dst, proto)
}

// SetCluster makes cluster the cluster table (it is the caller's snapshot: neither the map nor
// its services change afterwards) and writes the keys in changed into every sandbox. The first
// call rewrites every sandbox whole (see the package doc); later ones write only the changed
// keys, and only where no kata-ipvs service hides them. A sandbox that fails is logged and
// counted, and the others are still written; the error returned names the failures.
// Removed real servers are forgotten by the datapath; connections to removed UDP real
// servers are cleaned as kube-proxy does (TCP ones are left to end: IPVS keeps them).
func (t *Tables) SetCluster(ctx context.Context, cluster map[ipvs.ServiceKey]*ipvs.Service, changed []ipvs.ServiceKey) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	first := !t.Synced()
	old := t.cluster
	t.cluster = cluster
	t.shared = nil
	var gone []netip.AddrPort // UDP real servers no longer in any service they were in
	if !first {
		for _, k := range changed {
			if k.Proto != ipvs.UDP {
				continue
			}
			if o := old[k]; o != nil {
				for _, d := range o.Servers {
					if n := cluster[k]; n == nil || !hasServer(n, d.Addr) {
						gone = append(gone, d.Addr)
					}
				}
			}
		}
	}
	var errs []error
	for _, id := range t.sandboxes() {
		err := t.pushCluster(ctx, id, first, changed)
		if err == nil && len(gone) > 0 {
			err = t.cleanup(ctx, id, gone)
		}
		if err != nil {
			t.noteErr(id, err)
			errs = append(errs, fmt.Errorf("sandbox %s: %w", id, err))
			continue
		}
		t.noteOK(id)
	}
	if first {
		t.starting = false
		close(t.ready)
	}
	return errors.Join(errs...)
}

func hasServer(s *ipvs.Service, a netip.AddrPort) bool {
	return slices.ContainsFunc(s.Servers, func(d ipvs.Server) bool { return d.Addr == a })
}

// cleanup deletes the connections of sandbox id to the removed UDP real servers gone (the
// dataplane matches connections by address and protocol; a server address still used by
// another UDP service of the sandbox keeps its connections).
func (t *Tables) cleanup(ctx context.Context, id string, gone []netip.AddrPort) error {
	inUse := map[netip.Addr]bool{}
	m := t.merged(id)
	for _, s := range m.Services {
		if s.Proto == ipvs.UDP {
			for _, d := range s.Servers {
				inUse[d.Addr.Addr()] = true
			}
		}
	}
	done := map[netip.Addr]bool{}
	for _, a := range gone {
		if inUse[a.Addr()] || done[a.Addr()] {
			continue
		}
		done[a.Addr()] = true
		if _, err := t.lb.CleanupConns(ctx, id, a.Addr(), uint8(ipvs.UDP)); err != nil {
			return fmt.Errorf("clean up connections to %s: %w", a, err)
		}
	}
	return nil
}

// pushCluster writes the cluster table into sandbox id. Called under mu.
func (t *Tables) pushCluster(ctx context.Context, id string, whole bool, changed []ipvs.ServiceKey) error {
	m := t.merged(id)
	if whole {
		return t.lb.SetLB(ctx, id, m)
	}
	o := t.kata[id]
	for _, k := range changed {
		if o != nil {
			if _, hidden := o.services[k]; hidden {
				continue
			}
		}
		if err := t.lb.SetLBService(ctx, id, m, k); err != nil {
			return err
		}
	}
	return nil
}

// Reinstall writes sandbox id's effective table whole (a sandbox that was added or
// re-adopted). Before the first cluster sync it does nothing: that sync writes every sandbox.
func (t *Tables) Reinstall(ctx context.Context, id string) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.Synced() {
		return nil
	}
	return t.writeWhole(ctx, id)
}

// writeWhole writes sandbox id's effective table whole and records the outcome. Called under
// mu.
func (t *Tables) writeWhole(ctx context.Context, id string) error {
	if err := t.lb.SetLB(ctx, id, t.merged(id)); err != nil {
		t.noteErr(id, err)
		return fmt.Errorf("cluster table: sandbox %s: %w", id, err)
	}
	t.noteOK(id)
	return nil
}

// RetryFailed writes whole, again, the effective table of every sandbox whose last write
// failed (a map without room, a datapath briefly unloaded), so that a failure is not left in
// force until the services it missed change again. The agent runs it periodically; it returns
// the failures that remain.
func (t *Tables) RetryFailed(ctx context.Context) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if !t.Synced() {
		return nil
	}
	var errs []error
	for _, id := range t.sandboxes() {
		if st, ok := t.status[id]; !ok || st.Err == "" {
			continue
		}
		if err := t.writeWhole(ctx, id); err != nil {
			errs = append(errs, err)
			continue
		}
		t.log.Info("cluster table: sandbox written after an earlier failure", "sandbox", id)
	}
	return errors.Join(errs...)
}

// Forget drops a removed sandbox.
func (t *Tables) Forget(id string) {
	t.mu.Lock()
	delete(t.kata, id)
	delete(t.status, id)
	t.mu.Unlock()
}

func (t *Tables) noteOK(id string) {
	st := SandboxStatus{}
	if o := t.kata[id]; o != nil {
		for k := range o.services {
			if _, ok := t.cluster[k]; ok {
				st.Overridden++
			}
		}
	}
	st.Programmed = len(t.cluster) - st.Overridden
	t.status[id] = st
}

func (t *Tables) noteErr(id string, err error) {
	t.errors++
	st := t.status[id]
	st.Err = err.Error()
	t.status[id] = st
	t.log.Error("cluster table: sandbox not updated", "sandbox", id, "err", err)
}

// Status returns the cluster table's state in every sandbox written so far, and the number of
// failed writes since the start.
func (t *Tables) Status() (map[string]SandboxStatus, uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return maps.Clone(t.status), t.errors
}
