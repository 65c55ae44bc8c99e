package netmon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Controller is what netmon needs of control.Controller: the sandboxes, a snapshot of one's
// NICs and routes, and the typed kata-network operations.
type Controller interface {
	Sandboxes() []control.Sandbox
	Unhealthy() map[string]string
	NICs(id string) ([]control.NIC, []netspec.Route, error)
	AddIface(ctx context.Context, id string, req netspec.AddRequest) (netspec.Interface, error)
	DelIface(ctx context.Context, id string, in netspec.Interface) error
	UpdateIface(ctx context.Context, id string, in netspec.Interface) (netspec.Interface, error)
	AddRoute(ctx context.Context, id string, r netspec.Route) (netspec.Route, error)
	DelRoute(ctx context.Context, id string, r netspec.Route) ([]netspec.Route, error)
}

var _ Controller = (*control.Controller)(nil)

// Options tune a Monitor; zero values take the defaults.
type Options struct {
	// Quiet is how long the netns must be free of events before a burst is applied (100ms).
	Quiet time.Duration
	// MaxDelay bounds how long a burst that never goes quiet is held (1s).
	MaxDelay time.Duration
	// RetryAfter is the first pause before a failed reconcile or watch is tried again (1s);
	// it doubles up to a minute.
	RetryAfter time.Duration
	// Logger; nil uses slog.Default().
	Logger *slog.Logger
	// OnReconciled, when set, is called after each reconcile of a sandbox with its error
	// (nil when the netns and the sandbox agree). Tests wait on it.
	OnReconciled func(id string, err error)
}

// Monitor runs one watcher per sandbox with netmon on.
type Monitor struct {
	ctrl Controller
	o    Options
	log  *slog.Logger
	sync chan struct{}
}

// New returns a Monitor over ctrl.
func New(ctrl Controller, o Options) *Monitor {
	o.Quiet = cmp.Or(o.Quiet, 100*time.Millisecond)
	o.MaxDelay = cmp.Or(o.MaxDelay, time.Second)
	o.RetryAfter = cmp.Or(o.RetryAfter, time.Second)
	return &Monitor{ctrl: ctrl, o: o, log: cmp.Or(o.Logger, slog.Default()), sync: make(chan struct{}, 1)}
}

// Sync tells the Monitor that sandboxes may have been added or removed. It never blocks.
func (m *Monitor) Sync() {
	select {
	case m.sync <- struct{}{}:
	default:
	}
}

// running is a started watcher.
type running struct {
	sb     control.Sandbox
	cancel context.CancelFunc
	done   chan struct{}
}

// Run watches every healthy sandbox with netmon on until ctx ends, starting and stopping
// watchers as sandboxes come and go (Sync) or change health. It returns nil when ctx ends, after every watcher stopped.
func (m *Monitor) Run(ctx context.Context) error {
	ws := map[string]*running{}
	// Health changes without a Sync (a node task marks a sandbox down and up again): look at
	// the set again now and then. This lists sandboxes, never a netns.
	resync := time.NewTicker(30 * time.Second)
	defer resync.Stop()
	defer func() {
		for _, r := range ws {
			r.cancel()
		}
		for _, r := range ws {
			<-r.done
		}
	}()
	for {
		want := map[string]control.Sandbox{}
		broken := m.ctrl.Unhealthy()
		for _, sb := range m.ctrl.Sandboxes() {
			// A sandbox without hot-plug that the operator did not choose (a discovered one
			// without Kata's extra monitor) is not watched: its VM could not get the NICs.
			if sb.Netmon && broken[sb.ID] == "" && sb.NoHotplug == "" {
				want[sb.ID] = sb
			}
		}
		for id, r := range ws {
			if sb, ok := want[id]; !ok || sb != r.sb {
				r.cancel()
				<-r.done
				delete(ws, id)
			}
		}
		for id, sb := range want {
			if ws[id] != nil {
				continue
			}
			wctx, cancel := context.WithCancel(ctx)
			r := &running{sb: sb, cancel: cancel, done: make(chan struct{})}
			ws[id] = r
			w := &watcher{m: m, sb: sb, skipped: map[string]string{}}
			go func() {
				defer close(r.done)
				w.run(wctx)
			}()
		}
		select {
		case <-ctx.Done():
			return nil
		case <-m.sync:
		case <-resync.C:
		}
	}
}

// watcher watches one sandbox's netns.
type watcher struct {
	m       *Monitor
	sb      control.Sandbox
	skipped map[string]string // link -> why it was last skipped, so each reason is logged once
}

// run subscribes and reconciles until ctx ends, starting over (with a growing pause) when the
// subscription fails.
func (w *watcher) run(ctx context.Context) {
	pause := w.m.o.RetryAfter
	for {
		err := w.watch(ctx)
		if ctx.Err() != nil {
			return
		}
		w.m.log.Warn("netmon: watch failed; starting over", "sandbox", w.sb.ID, "netns", w.sb.NetNS, "err", err, "retryIn", pause)
		select {
		case <-ctx.Done():
			return
		case <-time.After(pause):
		}
		pause = min(2*pause, time.Minute)
	}
}

// errSubscription: a netlink subscription ended (its socket failed or overflowed).
var errSubscription = errors.New("netlink subscription ended")

// watch subscribes to the netns's link, address and route events, reconciles once, then after
// every quiet burst of events, until ctx ends or a subscription fails.
func (w *watcher) watch(ctx context.Context) error {
	ns, err := netns.GetFromPath(w.sb.NetNS)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", w.sb.NetNS, err)
	}
	defer ns.Close()
	done := make(chan struct{})
	failed := make(chan error, 3)
	onErr := func(err error) {
		select {
		case failed <- err:
		default:
		}
	}
	links := make(chan netlink.LinkUpdate, 256)
	addrs := make(chan netlink.AddrUpdate, 256)
	routes := make(chan netlink.RouteUpdate, 256)
	defer func() {
		// Closing done closes the sockets; a subscription goroutine blocked on a full channel
		// would wait forever, so drain each channel until its goroutine closes it.
		close(done)
		go func() {
			for range links {
			}
		}()
		go func() {
			for range addrs {
			}
		}()
		go func() {
			for range routes {
			}
		}()
	}()
	if err := netlink.LinkSubscribeWithOptions(links, done, netlink.LinkSubscribeOptions{Namespace: &ns, ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribe to links in %s: %w", w.sb.NetNS, err)
	}
	if err := netlink.AddrSubscribeWithOptions(addrs, done, netlink.AddrSubscribeOptions{Namespace: &ns, ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribe to addresses in %s: %w", w.sb.NetNS, err)
	}
	if err := netlink.RouteSubscribeWithOptions(routes, done, netlink.RouteSubscribeOptions{Namespace: &ns, ErrorCallback: onErr}); err != nil {
		return fmt.Errorf("subscribe to routes in %s: %w", w.sb.NetNS, err)
	}
	w.m.log.Info("netmon: watching", "sandbox", w.sb.ID, "netns", w.sb.NetNS)
	// Subscribed first, then reconciled: nothing that happens in between is missed.
	var (
		quiet, deadline *time.Timer
		quietC, deadC   <-chan time.Time
		retry           <-chan time.Time
		pause           = w.m.o.RetryAfter
	)
	stop := func(t *time.Timer) {
		if t != nil {
			t.Stop()
		}
	}
	defer func() { stop(quiet); stop(deadline) }()
	apply := func() {
		stop(quiet)
		stop(deadline)
		quietC, deadC, retry = nil, nil, nil
		err := w.reconcile(ctx)
		if ctx.Err() != nil {
			return
		}
		if w.m.o.OnReconciled != nil {
			w.m.o.OnReconciled(w.sb.ID, err)
		}
		if err != nil {
			w.m.log.Error("netmon: reconcile failed; trying again", "sandbox", w.sb.ID, "err", err, "retryIn", pause)
			retry = time.After(pause)
			pause = min(2*pause, time.Minute)
			return
		}
		pause = w.m.o.RetryAfter
	}
	event := func() {
		if quiet == nil {
			quiet, deadline = time.NewTimer(w.m.o.Quiet), time.NewTimer(w.m.o.MaxDelay)
			quietC, deadC = quiet.C, deadline.C
			return
		}
		if deadC == nil { // no burst pending: this event starts one
			deadline.Reset(w.m.o.MaxDelay)
			deadC = deadline.C
		}
		quiet.Reset(w.m.o.Quiet)
		quietC = quiet.C
	}
	// mute holds the ifindexes of links netmon never takes, learned from their link events.
	mute := map[int]bool{}
	apply()
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-failed:
			return fmt.Errorf("%w: %v", errSubscription, err)
		case u, ok := <-links:
			if !ok {
				return errSubscription
			}
			if ignored(u.Link) {
				// Its addresses and routes (a tap coming up gets an IPv6 link-local address
				// and routes) need no reconcile either.
				if u.Header.Type == unix.RTM_DELLINK {
					delete(mute, int(u.Index))
				} else {
					mute[int(u.Index)] = true
				}
				continue
			}
			event()
		case u, ok := <-addrs:
			if !ok {
				return errSubscription
			}
			if !mute[u.LinkIndex] {
				event()
			}
		case u, ok := <-routes:
			if !ok {
				return errSubscription
			}
			if !mute[u.LinkIndex] {
				event()
			}
		case <-quietC:
			apply()
		case <-deadC:
			apply()
		case <-retry:
			apply()
		}
	}
}

// ignored reports whether a link event is about a link netmon never takes (a tap kata-dp or
// QEMU made, kata-dp's macvtaps): such events need no reconcile, so kata-dp's own work does not
// wake netmon up.
func ignored(l netlink.Link) bool {
	if l == nil || l.Attrs() == nil {
		return false
	}
	for _, k := range skipKinds {
		if l.Type() == k {
			return true
		}
	}
	return isNetmonTap(l.Attrs().Name)
}

// skip logs, once per reason, that a link is not joined.
func (w *watcher) skip(name, why string) {
	if w.skipped[name] == why {
		return
	}
	w.skipped[name] = why
	w.m.log.Info("netmon: link not joined", "sandbox", w.sb.ID, "link", name, "reason", why)
}

// joined forgets why a link was skipped, so a new refusal is logged again.
func (w *watcher) joined(name string) { delete(w.skipped, name) }

// leftoverTap removes a tap of netmon's naming that no NIC uses: an agent killed in the middle
// of a join left it behind, and add-iface would adopt it (and never join an adopted tap).
func (w *watcher) leftoverTap(name string) error {
	ns, err := netns.GetFromPath(w.sb.NetNS)
	if err != nil {
		return fmt.Errorf("open netns %s: %w", w.sb.NetNS, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in netns %s: %w", w.sb.NetNS, err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("look up %s: %w", name, err)
	}
	if l.Type() != "tuntap" || !isNetmonTap(name) {
		return nil
	}
	if err := h.LinkDel(l); err != nil {
		return fmt.Errorf("remove leftover tap %s: %w", name, err)
	}
	w.m.log.Warn("netmon: removed a tap left behind by an interrupted join", "sandbox", w.sb.ID, "tap", name)
	return nil
}
