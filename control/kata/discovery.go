package kata

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/fsnotify/fsnotify"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netdev"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Controller is what Discovery needs of the control plane (*control.Controller).
type Controller interface {
	Sandboxes() []control.Sandbox
	Endpoints() []control.Endpoint
	AddSandbox(ctx context.Context, spec control.SandboxSpec) (control.Sandbox, error)
	DelSandbox(ctx context.Context, id string) error
	AdoptIface(ctx context.Context, id string, req netspec.AddRequest, routes []netspec.Route) (netspec.Interface, error)
	ReleaseSandbox(ctx context.Context, id string) error
	SetDown(id, reason string)
}

// Errors of Release and Adopt.
var (
	// ErrNotKata: the id is not a sandbox in Kata's runtime directory (a control.ErrNotFound).
	ErrNotKata = fmt.Errorf("%w: not a Kata sandbox of this node", control.ErrNotFound)
	// ErrByHand: the sandbox is registered by hand; discovery leaves it alone (a
	// control.ErrInvalid).
	ErrByHand = fmt.Errorf("%w: registered by hand", control.ErrInvalid)
)

// Discovery registers the sandboxes Kata runs on the node, takes over their tcfilter pairs,
// marks those whose VM is gone unhealthy, and removes (garbage-collects) those whose
// directories Kata removed. It watches the runtime directory with inotify (fsnotify) and
// does a full, idempotent scan on each batch of events and when it starts: the agent can
// start before or after the sandboxes, and a scan interrupted by a crash is finished by the
// next one.
//
// Sandboxes registered by hand are left alone (one with the id of a Kata sandbox is reported
// once), and discovery only ever removes sandboxes it registered. A released sandbox
// (Release) stays released, across agent restarts, until Adopt or until Kata removes it.
//
// Run is the long-running task (a watch.Task without period or trigger); Scan, Release and
// Adopt may be called from other goroutines: they are serialised.
type Discovery struct {
	layout   Layout
	ctrl     Controller
	log      *slog.Logger
	released string // directory of release marks, one empty file per sandbox id

	mu       sync.Mutex        // serialises scans, releases and adoptions
	reported map[string]string // what was last logged per key, so each finding is logged once
	running  atomic.Bool
	kick     chan struct{}
	pids     *pidWatch // the hypervisors of the managed sandboxes, while Run runs; under mu
}

// Options configure a Discovery.
type Options struct {
	// Dir is Kata's runtime directory (DefaultDir when "").
	Dir string
	// StateDir keeps the release marks (under StateDir/kata-released); "" keeps them in
	// memory only.
	StateDir string
	Logger   *slog.Logger
}

// New returns a Discovery of the sandboxes under o.Dir for ctrl.
func New(ctrl Controller, o Options) *Discovery {
	d := &Discovery{
		layout:   Layout{Dir: cmp.Or(o.Dir, DefaultDir)},
		ctrl:     ctrl,
		log:      cmp.Or(o.Logger, slog.Default()).With("task", "kata-discovery"),
		reported: map[string]string{},
		kick:     make(chan struct{}, 1),
	}
	if o.StateDir != "" {
		d.released = filepath.Join(o.StateDir, "kata-released")
	}
	return d
}

// Dir is the runtime directory watched.
func (d *Discovery) Dir() string { return d.layout.Dir }

// Running reports whether the watch is set up and the first scan is done (for /readyz).
func (d *Discovery) Running() bool { return d.running.Load() }

// Run watches the runtime directory until ctx ends. It returns early (to be restarted by its
// watch.Group) when the watch cannot be set up or fails.
func (d *Discovery) Run(ctx context.Context) error {
	defer d.running.Store(false)
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return fmt.Errorf("kata discovery: %w", err)
	}
	defer w.Close()
	watched := map[string]bool{}
	// watchTree watches the runtime directory, sbs/, vm/ and every sandbox directory in
	// them (Kata creates persist.json and the sockets inside those), adding what appeared.
	watchTree := func() error {
		dirs := []string{d.layout.Dir, d.layout.SbsDir(), d.layout.VMDir()}
		for _, parent := range dirs[1:] {
			ents, err := os.ReadDir(parent)
			if err != nil {
				continue
			}
			for _, e := range ents {
				if e.IsDir() {
					dirs = append(dirs, filepath.Join(parent, e.Name()))
				}
			}
		}
		for p := range watched {
			if !slices.Contains(dirs, p) {
				delete(watched, p) // removed directories drop out of the watch by themselves
			}
		}
		for _, p := range dirs {
			if watched[p] {
				continue
			}
			if err := w.Add(p); err != nil {
				if errors.Is(err, os.ErrNotExist) || errors.Is(err, unix.ENOENT) {
					continue
				}
				return fmt.Errorf("watch %s: %w", p, err)
			}
			watched[p] = true
		}
		return nil
	}
	if err := watchTree(); err != nil {
		return fmt.Errorf("kata discovery: %w", err)
	}
	if !watched[d.layout.Dir] {
		return fmt.Errorf("kata discovery: %s does not exist", d.layout.Dir)
	}
	d.mu.Lock()
	d.pids = newPidWatch(d.Kick)
	d.mu.Unlock()
	defer func() {
		d.mu.Lock()
		d.pids.close()
		d.pids = nil
		d.mu.Unlock()
	}()
	d.Scan(ctx)
	d.running.Store(true)
	d.log.Info("watching Kata's runtime directory", "dir", d.layout.Dir)
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.Events:
			if !ok {
				return errors.New("kata discovery: watch closed")
			}
			d.log.Debug("event", "op", ev.Op.String(), "path", ev.Name)
		case err, ok := <-w.Errors:
			if !ok {
				return errors.New("kata discovery: watch closed")
			}
			// An overflow lost events: the full scan below catches up.
			d.log.Warn("watch error; rescanning", "err", err)
		case <-d.kick:
		}
		// Take every event queued meanwhile, then scan once for the lot.
		for drained := false; !drained; {
			select {
			case <-w.Events:
			case <-d.kick:
			default:
				drained = true
			}
		}
		if err := watchTree(); err != nil {
			return fmt.Errorf("kata discovery: %w", err)
		}
		d.Scan(ctx)
	}
}

// Kick asks Run for a scan (after a change it cannot see, such as a process exit).
func (d *Discovery) Kick() {
	select {
	case d.kick <- struct{}{}:
	default:
	}
}

// logOnce logs a finding about key once, until it changes.
func (d *Discovery) logOnce(key, msg string, level slog.Level, args ...any) {
	sig := msg + fmt.Sprint(args...)
	if d.reported[key] == sig {
		return
	}
	d.reported[key] = sig
	d.log.Log(context.Background(), level, msg, args...)
}

// Scan brings the registered sandboxes in line with Kata's directories once. While Run runs,
// the hypervisors of the sandboxes it manages are watched (an exit starts a scan).
func (d *Discovery) Scan(ctx context.Context) {
	d.mu.Lock()
	defer d.mu.Unlock()
	pids := map[string]int{}
	defer func() {
		if d.pids != nil {
			d.pids.set(pids)
		}
	}()
	ids, err := d.layout.IDs()
	if err != nil {
		d.logOnce("list", "cannot list Kata's sandboxes", slog.LevelWarn, "err", err)
		return
	}
	registered := map[string]control.Sandbox{}
	for _, sb := range d.ctrl.Sandboxes() {
		registered[sb.ID] = sb
	}
	// Garbage collection: discovered sandboxes whose sbs/<id> Kata removed.
	for id, sb := range registered {
		if sb.Source != control.SourceDiscovery || slices.Contains(ids, id) {
			continue
		}
		if err := d.ctrl.DelSandbox(ctx, id); err != nil {
			d.logOnce("gc/"+id, "garbage collection failed; will retry", slog.LevelWarn, "sandbox", id, "err", err)
			continue
		}
		d.log.Info("sandbox garbage-collected: Kata removed it", "sandbox", id)
		d.forgetReports(id)
	}
	d.dropStaleMarks(ids)
	adopted := map[string]map[string]bool{} // sandbox -> taps
	for _, ep := range d.ctrl.Endpoints() {
		if adopted[ep.Sandbox] == nil {
			adopted[ep.Sandbox] = map[string]bool{}
		}
		adopted[ep.Sandbox][ep.Tap] = true
	}
	for _, id := range ids {
		if d.isReleased(id) {
			continue
		}
		if sb, ok := registered[id]; ok && sb.Source != control.SourceDiscovery {
			d.logOnce("hand/"+id, "Kata sandbox registered by hand: discovery leaves it alone", slog.LevelInfo, "sandbox", id)
			continue
		}
		st, err := d.layout.Read(id)
		if errors.Is(err, os.ErrNotExist) {
			continue // Kata has made the directory and not written the state yet
		}
		if err != nil {
			// Kata writes persist.json in place: a truncated read is retried on the next
			// write event; foreign or broken content is reported once.
			d.logOnce("read/"+id, "Kata sandbox skipped: its state cannot be used", slog.LevelWarn, "sandbox", id, "err", err)
			continue
		}
		delete(d.reported, "read/"+id)
		if _, ok := registered[id]; !ok {
			if err := d.register(ctx, id, st); err != nil {
				d.logOnce("add/"+id, "Kata sandbox not registered; will retry", slog.LevelWarn, "sandbox", id, "err", err)
				continue
			}
		}
		d.takeover(ctx, id, st, adopted[id])
		if pid := st.HypervisorState.Pid; pid > 0 {
			if why := hypervisorGone(pid, id); why != "" {
				d.ctrl.SetDown(id, why)
			} else {
				d.ctrl.SetDown(id, "")
				pids[id] = pid
			}
		}
	}
}

// register adds the Kata sandbox id to the control plane.
func (d *Discovery) register(ctx context.Context, id string, st *SandboxState) error {
	spec := control.SandboxSpec{ID: id, NetNS: st.Network.NetworkID, Mode: control.ModeTC, Source: control.SourceDiscovery}
	// Netmon (links attached later join the VM by themselves) is on for discovered sandboxes,
	// with the first pair's veth as the uplink it never takes. With more than one pair it
	// stays off: netmon could take a later pair's veth before its takeover.
	switch pairs, _ := st.Pairs(); len(pairs) {
	case 0:
		spec.Netmon = true
	case 1:
		spec.Netmon, spec.Uplink = true, pairs[0].Veth
	default:
		spec.Uplink = pairs[0].Veth
		d.log.Info("netmon off for a Kata sandbox with several pairs", "sandbox", id, "pairs", len(pairs))
	}
	extra := d.layout.ExtraMonitor(id)
	if fi, err := os.Stat(extra); err == nil && fi.Mode()&os.ModeSocket != 0 {
		spec.QMP = extra
	} else {
		spec.NoHotplug = fmt.Sprintf("no extra monitor socket %s (%s is held by Kata's shim): set extra_monitor_socket = \"qmp\" in Kata's [hypervisor.qemu] for hot-plug", extra, d.layout.QMPSocket(id))
	}
	if _, err := d.ctrl.AddSandbox(ctx, spec); err != nil {
		return err
	}
	d.log.Info("Kata sandbox registered", "sandbox", id, "netns", spec.NetNS, "qmp", spec.QMP, "noHotplug", spec.NoHotplug, "netmon", spec.Netmon)
	return nil
}

// takeover adopts each pair of the sandbox that is not adopted yet.
func (d *Discovery) takeover(ctx context.Context, id string, st *SandboxState, have map[string]bool) {
	pairs, others := st.Pairs()
	if len(others) > 0 {
		d.logOnce("others/"+id, "Kata endpoints without a veth/tap pair left untouched", slog.LevelInfo, "sandbox", id, "types", others)
	}
	ns := st.Network.NetworkID
	for _, p := range pairs {
		if have[p.Tap] {
			continue
		}
		key := "pair/" + id + "/" + p.Tap
		joined, err := Check(ns, p)
		if err != nil {
			d.logOnce(key, "Kata pair left untouched: not identified", slog.LevelWarn, "sandbox", id, "veth", p.Veth, "tap", p.Tap, "err", err)
			continue
		}
		idn, err := ReadIdentity(ns, p)
		if err != nil {
			d.logOnce(key, "Kata pair left untouched", slog.LevelWarn, "sandbox", id, "veth", p.Veth, "tap", p.Tap, "err", err)
			continue
		}
		before := pairCounts(ns, p)
		if _, err := d.ctrl.AdoptIface(ctx, id, idn.Iface, idn.Routes); err != nil {
			d.logOnce(key, "takeover failed; Kata's plumbing stays; will retry", slog.LevelWarn, "sandbox", id, "veth", p.Veth, "tap", p.Tap, "err", err)
			continue
		}
		delete(d.reported, key)
		after := pairCounts(ns, p)
		d.log.Info("Kata pair taken over", "sandbox", id, "veth", p.Veth, "tap", p.Tap, "mac", idn.Iface.HwAddr,
			"wasJoined", joined, "routes", len(idn.Routes), "lostEstimate", lossBetween(before, after))
	}
}

// pairCounts are the frames that entered the netns through the pair's devices and left
// through them (link counters); -1s when they cannot be read.
func pairCounts(ns string, p Pair) [2]int64 {
	var in, out int64
	err := netdev.InNetNS(ns, func() error {
		for _, n := range []string{p.Veth, p.Tap} {
			l, err := netlink.LinkByName(n)
			if err != nil {
				return err
			}
			s := l.Attrs().Statistics
			if s == nil {
				return errors.New("no statistics")
			}
			in += int64(s.RxPackets)
			out += int64(s.TxPackets)
		}
		return nil
	})
	if err != nil {
		return [2]int64{-1, -1}
	}
	return [2]int64{in, out}
}

// lossBetween estimates the frames lost between two pairCounts: the growth of frames in minus
// frames out (frames in flight at either reading count too: an estimate within a few frames).
func lossBetween(a, b [2]int64) int64 {
	if a[0] < 0 || b[0] < 0 {
		return -1
	}
	return max(0, (b[0]-a[0])-(b[1]-a[1]))
}

// hypervisorGone says why the sandbox's hypervisor (pid) is gone, or "" when it runs. A pid
// now used by a process whose command line does not name the sandbox counts as gone (Kata
// starts QEMU with -name sandbox-<id>).
func hypervisorGone(pid int, id string) string {
	proc := filepath.Join("/proc", strconv.Itoa(pid))
	s, err := os.ReadFile(filepath.Join(proc, "stat"))
	if err != nil {
		return fmt.Sprintf("hypervisor (pid %d) is gone", pid)
	}
	// A zombie has exited (its parent has not reaped it yet): field 3, after the command.
	if i := bytes.LastIndexByte(s, ')'); i > 0 && len(s) > i+2 && s[i+2] == 'Z' {
		return fmt.Sprintf("hypervisor (pid %d) has exited", pid)
	}
	b, err := os.ReadFile(filepath.Join(proc, "cmdline"))
	if err != nil {
		return fmt.Sprintf("hypervisor (pid %d) is gone", pid)
	}
	if !strings.Contains(strings.ReplaceAll(string(b), "\x00", " "), id) {
		return fmt.Sprintf("hypervisor (pid %d) is gone (the pid now runs something else)", pid)
	}
	return ""
}

func (d *Discovery) forgetReports(id string) {
	for k := range d.reported {
		if strings.Contains(k, "/"+id) {
			delete(d.reported, k)
		}
	}
}

// Release hands the discovered sandbox id back to Kata's tcfilter plumbing (see
// control.Controller.ReleaseSandbox) and keeps discovery from adopting it again until Adopt.
func (d *Discovery) Release(ctx context.Context, id string) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.layout.Present(id) {
		return fmt.Errorf("release %s: %w (%s)", id, ErrNotKata, d.layout.SbsDir())
	}
	if err := d.mark(id, true); err != nil {
		return fmt.Errorf("release %s: %w", id, err)
	}
	if err := d.ctrl.ReleaseSandbox(ctx, id); err != nil {
		if errors.Is(err, control.ErrNoSuchSandbox) {
			return nil // not adopted (yet): it stays with Kata
		}
		_ = d.mark(id, false)
		return err
	}
	d.forgetReports(id)
	return nil
}

// Adopt lifts a release: the next scan (started now) registers the sandbox and takes its
// pairs over again.
func (d *Discovery) Adopt(ctx context.Context, id string) error {
	d.mu.Lock()
	if !d.layout.Present(id) {
		d.mu.Unlock()
		return fmt.Errorf("adopt %s: %w (%s)", id, ErrNotKata, d.layout.SbsDir())
	}
	for _, sb := range d.ctrl.Sandboxes() {
		if sb.ID == id && sb.Source != control.SourceDiscovery {
			d.mu.Unlock()
			return fmt.Errorf("adopt %s: %w: discovery leaves it alone", id, ErrByHand)
		}
	}
	err := d.mark(id, false)
	d.mu.Unlock()
	if err != nil {
		return fmt.Errorf("adopt %s: %w", id, err)
	}
	d.Scan(ctx)
	return nil
}

// Released lists the sandboxes released and not adopted again.
func (d *Discovery) Released() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.releasedLocked()
}

// releasedLocked is Released with d.mu held.
func (d *Discovery) releasedLocked() []string {
	var out []string
	for k := range d.reported {
		if id, ok := strings.CutPrefix(k, "released/"); ok {
			out = append(out, id)
		}
	}
	if d.released != "" {
		ents, _ := os.ReadDir(d.released)
		for _, e := range ents {
			if !slices.Contains(out, e.Name()) {
				out = append(out, e.Name())
			}
		}
	}
	slices.Sort(out)
	return out
}

func (d *Discovery) isReleased(id string) bool {
	if _, ok := d.reported["released/"+id]; ok {
		return true
	}
	if d.released == "" {
		return false
	}
	_, err := os.Stat(filepath.Join(d.released, id))
	return err == nil
}

// mark sets or clears the release mark of id (a file, so it survives agent restarts).
func (d *Discovery) mark(id string, on bool) error {
	if err := control.ValidSandboxID(id); err != nil {
		return err
	}
	if on {
		d.reported["released/"+id] = "released"
	} else {
		delete(d.reported, "released/"+id)
	}
	if d.released == "" {
		return nil
	}
	p := filepath.Join(d.released, id)
	if !on {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
		return nil
	}
	if err := os.MkdirAll(d.released, 0o700); err != nil {
		return err
	}
	return os.WriteFile(p, nil, 0o600)
}

// dropStaleMarks removes the release marks of sandboxes Kata no longer has.
func (d *Discovery) dropStaleMarks(ids []string) {
	for _, id := range d.releasedLocked() {
		if !slices.Contains(ids, id) {
			_ = d.mark(id, false)
		}
	}
}
