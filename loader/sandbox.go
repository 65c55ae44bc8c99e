package loader

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// DefaultRoot is where sandboxes are pinned unless the caller says otherwise.
const DefaultRoot = "/sys/fs/bpf/kata-dp"

// Program names one of the datapath's entry points.
type Program string

// The datapath's programs. Their names are what the kernel shows (bpftool, tc) and how
// kata-dp recognises its own attachments.
const (
	ProgTapIn    Program = "kdp_tap_in"    // tap ingress: frames from the guest
	ProgUplinkIn Program = "kdp_uplink_in" // uplink ingress: frames for the guest

	// xdp mode, in front of the tc programs (which stay attached for what XDP passes on).
	ProgXDPTap    Program = "kdp_xdp_tap"    // tap XDP: frames from the guest
	ProgXDPUplink Program = "kdp_xdp_uplink" // uplink XDP: frames for the guest
)

// Errors callers can test for.
var (
	// ErrBadSandboxID is returned for an id that cannot name a pin directory.
	ErrBadSandboxID = errors.New("bad sandbox id")
	// ErrUnknownProgram is returned for a program name the datapath does not have.
	ErrUnknownProgram = errors.New("unknown program")
)

// sandboxIDRe and maxSandboxID say which ids can name a pin directory; the length is checked
// apart, as a bounded repetition ({0,127}) compiles into one copy of the class per repetition
// (milliseconds at the start of every kata-dp process).
var sandboxIDRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]*$`)

const maxSandboxID = 128

func validSandboxID(id string) bool { return len(id) <= maxSandboxID && sandboxIDRe.MatchString(id) }

// Maps are the sandbox's maps, pinned by name in its directory.
type Maps struct {
	Endpoints  *ebpf.Map
	Endpoints6 *ebpf.Map // the IPv6 side of tap endpoints (beside Endpoints, whose layout stays)
	Stats      *ebpf.Map
	DropsExt   *ebpf.Map // drop reasons beyond the eight Stats holds
	Routes     *ebpf.Map
	Routes6    *ebpf.Map // IPv6 routes, same generations as Routes
	Config     *ebpf.Map
	LBSvc      *ebpf.Map
	LBHash     *ebpf.Map // sh/dh bucket tables
	LBBackend  *ebpf.Map
	LBStats    *ebpf.Map
	LBConns    *ebpf.Map
	LBCT       *ebpf.Map
	// LBCTMem is LBCT's memory, mapped once by Open (mapCT) and unmapped by Close, or nil
	// when the table cannot be mapped. It is valid only while the Sandbox is open: see
	// Sandbox.Close.
	LBCTMem []byte
	// LBStatsMem and LBConnsMem are LBStats' and LBConns' memory (the counter arrays), mapped
	// and unmapped as LBCTMem, or nil when they cannot be mapped.
	LBStatsMem []byte
	LBConnsMem []byte
	LBAff      *ebpf.Map
	LBSvc6     *ebpf.Map // IPv6 service masters
	LBBackend6 *ebpf.Map // IPv6 real server addresses
	LBCT6      *ebpf.Map
	LBAff6     *ebpf.Map
	LBVIPs     *ebpf.Map // the VIP prefilter (see maps.LB)
	XDPPorts   *ebpf.Map // xdp mode: devices whose XDP program redirects (see maps.XDPPorts)
	XDPTx      *ebpf.Map // xdp mode: DEVMAP_HASH of redirect targets by ingress ifindex
	// The monitor (bpf/lib/monitor.h): its settings, its per-CPU token buckets and its ring
	// buffer of events.
	Mon       *ebpf.Map
	MonRL     *ebpf.Map
	MonEvents *ebpf.Map
}

// Options tune a sandbox's collection when it is first created (a pinned map keeps the size
// it was created with).
type Options struct {
	// CTSize is the number of connection-table entries (two per connection); 0 = 16384. The
	// IPv4 table holds them in buckets of CTWays.
	CTSize uint32
	// ExtraLBRules makes room in the load balancer's maps for that many rules (services plus
	// real servers) beyond the 20000 of kata-ipvs (bpf/lib/lb.h), twice over like those (the
	// first sync after a restart writes a whole table beside the live one): the cluster table
	// of Kubernetes Services (control/kube), which must not eat the kata-ipvs budget. The
	// maps allocate no entries up front; their hash buckets cost about 16 bytes per entry
	// of room.
	ExtraLBRules uint32
	// LegacyTC makes Attach use a clsact qdisc and a direct-action bpf filter even where the
	// kernel has TCX, as it does by itself on kernels without TCX. It is for kernels whose TCX
	// misbehaves, and for hosts whose other tc users expect filters rather than links; it
	// applies to the attachments this Sandbox makes (a pinned TCX link is not converted).
	LegacyTC bool
	// GenericXDP makes AttachXDP attach in generic (skb) mode even where the driver runs XDP
	// natively, as it does by itself where the driver refuses: for drivers whose native XDP
	// misbehaves. Generic XDP costs more per frame (it runs after the skb is built).
	GenericXDP bool
}

// Sandbox is one sandbox's loaded datapath collection.
type Sandbox struct {
	ID         string
	dir        string
	objs       DatapathObjects
	ctMem      []byte // the IPv4 connection table's mapping (mapCT); nil: not mapped or closed
	statsMem   []byte // the counter arrays' mappings (mapArray); nil: not mapped or closed
	connsMem   []byte
	legacy     bool // Options.LegacyTC
	genericXDP bool // Options.GenericXDP
}

// Dir is the sandbox's pin directory.
func (s *Sandbox) Dir() string { return s.dir }

// Maps returns the sandbox's maps. They stay owned by the Sandbox.
func (s *Sandbox) Maps() Maps {
	o := &s.objs
	return Maps{
		Endpoints: o.KdpEndpoints, Endpoints6: o.KdpEndpoints6, Stats: o.KdpStats, DropsExt: o.KdpDropsExt,
		Routes: o.KdpRoutes, Routes6: o.KdpRoutes6, Config: o.KdpConfig,
		LBSvc: o.KdpLbSvc, LBHash: o.KdpLbHash, LBBackend: o.KdpLbBe, LBStats: o.KdpLbStats, LBConns: o.KdpLbConns, LBCT: o.KdpLbCt2, LBCTMem: s.ctMem,
		LBStatsMem: s.statsMem, LBConnsMem: s.connsMem, LBAff: o.KdpLbAff,
		LBSvc6: o.KdpLbSvc6, LBBackend6: o.KdpLbBe6, LBCT6: o.KdpLbCt6, LBAff6: o.KdpLbAff6, LBVIPs: o.KdpLbVips,
		XDPPorts: o.KdpXdpPorts, XDPTx: o.KdpXdpTx,
		Mon: o.KdpMon, MonRL: o.KdpMonRl, MonEvents: o.KdpMonEvents,
	}
}

// Program returns the loaded program p.
func (s *Sandbox) Program(p Program) (*ebpf.Program, error) {
	switch p {
	case ProgTapIn:
		return s.objs.KdpTapIn, nil
	case ProgUplinkIn:
		return s.objs.KdpUplinkIn, nil
	case ProgXDPTap:
		return s.objs.KdpXdpTap, nil
	case ProgXDPUplink:
		return s.objs.KdpXdpUplink, nil
	}
	return nil, fmt.Errorf("%w %q", ErrUnknownProgram, p)
}

// Spec returns the datapath's collection spec (for tests that inspect its BTF).
func Spec() (*ebpf.CollectionSpec, error) { return LoadDatapath() }

// Open loads the datapath for sandbox id under root, reusing the maps pinned there by an
// earlier run, and moves every pinned link of the sandbox onto the freshly loaded programs
// (in place: the device is never without a program). It mounts bpffs first if needed.
func Open(root, id string) (*Sandbox, error) {
	return OpenWithOptions(root, id, Options{})
}

// OpenWithOptions is Open with options for a sandbox created by this call.
func OpenWithOptions(root, id string, o Options) (*Sandbox, error) {
	if !validSandboxID(id) {
		return nil, fmt.Errorf("open sandbox %q: %w", id, ErrBadSandboxID)
	}
	if root == "" {
		root = DefaultRoot
	}
	if err := ensureBPFFS(root); err != nil {
		return nil, fmt.Errorf("open sandbox %s: %w", id, err)
	}
	dir := filepath.Join(root, pinDev(id))
	if err := os.MkdirAll(filepath.Join(dir, linksDir), 0o700); err != nil {
		return nil, fmt.Errorf("open sandbox %s: %w", id, err)
	}
	spec, err := LoadDatapath()
	if err != nil {
		return nil, fmt.Errorf("open sandbox %s: load spec: %w", id, err)
	}
	if o.CTSize > 0 {
		spec.Maps[CTPin].MaxEntries = ctBuckets(o.CTSize)
		spec.Maps["kdp_lb_ct6"].MaxEntries = o.CTSize
	}
	if x := o.ExtraLBRules; x > 0 {
		for name, n := range map[string]uint32{
			"kdp_lb_svc": 2 * x, "kdp_lb_svc6": 2 * x, "kdp_lb_hash": x, // two tables
			"kdp_lb_be": x, "kdp_lb_be6": x,
		} {
			spec.Maps[name].MaxEntries += n
		}
		// The counter arrays get their second half, the cluster table's ids' (CounterSlot).
		spec.Maps["kdp_lb_stats"].MaxEntries = 2 * CounterHalf
		spec.Maps["kdp_lb_conns"].MaxEntries = 2 * CounterHalf
	}
	// A pinned map keeps the size it was created with: a sandbox created by a run with other
	// Options (CTSize, ExtraLBRules) is re-adopted with its maps as they are (an earlier
	// connection table's successor is sized by migratePinned, after the table it replaces).
	for name, ms := range spec.Maps {
		if ms.Pinning != ebpf.PinByName || isCounters(name) {
			continue // the counter arrays take the size of these Options: migrated when it changes
		}
		if m, err := ebpf.LoadPinnedMap(filepath.Join(dir, name), nil); err == nil {
			ms.MaxEntries = m.MaxEntries()
			m.Close()
		}
	}
	if err := migratePinned(spec, dir); err != nil {
		return nil, fmt.Errorf("open sandbox %s: %w", id, err)
	}
	s := &Sandbox{ID: id, dir: dir, legacy: o.LegacyTC, genericXDP: o.GenericXDP}
	opts := &ebpf.CollectionOptions{Maps: ebpf.MapOptions{PinPath: dir}}
	if err := spec.LoadAndAssign(&s.objs, opts); err != nil {
		return nil, fmt.Errorf("open sandbox %s: load collection: %w", id, err)
	}
	// The IPv4 connection table is read and written in place (maps.LB's scan and clears): it
	// is mapped here, once, and unmapped by Close, so every reader (the sweeper and the
	// metrics, from goroutines of their own) uses the one mapping the Sandbox owns. Every
	// error below goes through Close, which unmaps it.
	mem, err := mapCT(s.objs.KdpLbCt2)
	if err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
		s.Close()
		return nil, fmt.Errorf("open sandbox %s: %w", id, err)
	}
	s.ctMem = mem
	// So are the counter arrays (claimed and read in place by maps.LB).
	for _, a := range []struct {
		m    *ebpf.Map
		mem  *[]byte
		what string
	}{{s.objs.KdpLbStats, &s.statsMem, "counters"}, {s.objs.KdpLbConns, &s.connsMem, "connection counts"}} {
		mem, err := mapArray(a.m, a.what)
		if err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			s.Close()
			return nil, fmt.Errorf("open sandbox %s: %w", id, err)
		}
		*a.mem = mem
	}
	if err := s.refreshLinks(linksDir); err != nil {
		s.Close()
		return nil, fmt.Errorf("open sandbox %s: %w", id, err)
	}
	if err := s.refreshLinks(xdpLinksDir); err != nil {
		s.Close()
		return nil, fmt.Errorf("open sandbox %s: %w", id, err)
	}
	return s, nil
}

// Close releases the sandbox's file descriptors and unmaps its connection table and counter
// arrays (Maps.LBCTMem, LBStatsMem, LBConnsMem). Pins stay: the datapath keeps running. A second Close does nothing.
//
// Close must not run while anything still uses the Sandbox's Maps: a closed map's file
// descriptor fails (or, reused, names another file), and a read of the unmapped table is a
// SIGSEGV of the process. The owner of the Sandbox orders the two: the agent's dataplane
// (control/dataplane, Sandbox.closing) takes a lock for writing before Close that every
// reader of the maps holds for reading while it reads, and the tests close last.
func (s *Sandbox) Close() error {
	var errs []error
	for _, m := range []struct {
		mem  *[]byte
		what string
	}{{&s.ctMem, "connection table"}, {&s.statsMem, "counters"}, {&s.connsMem, "connection counts"}} {
		if *m.mem != nil {
			if e := unix.Munmap(*m.mem); e != nil {
				errs = append(errs, fmt.Errorf("close sandbox %s: unmap the %s: %w", s.ID, m.what, e))
			}
			*m.mem = nil // never unmapped twice: the range may be another mapping by then
		}
	}
	return errors.Join(append(errs, s.objs.Close())...)
}

// Remove detaches every program kata-dp attached for sandbox id and deletes its pins. It is
// idempotent: a sandbox that is already gone is not an error.
func Remove(root, id string) error {
	if !validSandboxID(id) {
		return fmt.Errorf("remove sandbox %q: %w", id, ErrBadSandboxID)
	}
	if root == "" {
		root = DefaultRoot
	}
	dir := filepath.Join(root, pinDev(id))
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err := detachAll(dir, linksDir); err != nil {
		return fmt.Errorf("remove sandbox %s: %w", id, err)
	}
	if err := detachAll(dir, xdpLinksDir); err != nil {
		return fmt.Errorf("remove sandbox %s: %w", id, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("remove sandbox %s: %w", id, err)
	}
	return nil
}

// ensureBPFFS makes sure root lives on a bpf filesystem, mounting one at /sys/fs/bpf when the
// machine has none there (minimal hosts and fresh containers often don't).
func ensureBPFFS(root string) error {
	const bpffs = "/sys/fs/bpf"
	var st unix.Statfs_t
	if err := unix.Statfs(bpffs, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(bpffs, 0o700); err != nil {
		return fmt.Errorf("mount bpffs: %w", err)
	}
	if err := unix.Mount("bpf", bpffs, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("mount bpffs at %s: %w", bpffs, err)
	}
	return nil
}
