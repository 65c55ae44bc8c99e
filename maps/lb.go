package maps

import (
	"errors"
	"fmt"
	"net/netip"
	"structs"

	"github.com/cilium/ebpf"
)

// Scheduler is enum kdp_sched.
type Scheduler uint8

// Schedulers, numbered as the datapath knows them.
const (
	SchedRR    Scheduler = 1
	SchedWRR   Scheduler = 2
	SchedLC    Scheduler = 3
	SchedWLC   Scheduler = 4
	SchedLBLC  Scheduler = 5
	SchedLBLCR Scheduler = 6
	SchedDH    Scheduler = 7
	SchedSH    Scheduler = 8
	SchedSED   Scheduler = 9
	SchedNQ    Scheduler = 10
)

var schedNames = map[string]Scheduler{
	"rr": SchedRR, "wrr": SchedWRR, "lc": SchedLC, "wlc": SchedWLC, "lblc": SchedLBLC,
	"lblcr": SchedLBLCR, "dh": SchedDH, "sh": SchedSH, "sed": SchedSED, "nq": SchedNQ,
}

// ParseScheduler maps an ipvsadm scheduler name to the datapath's number.
func ParseScheduler(name string) (Scheduler, error) {
	if s, ok := schedNames[name]; ok {
		return s, nil
	}
	return 0, fmt.Errorf("unknown scheduler %q", name)
}

func (s Scheduler) String() string {
	for n, v := range schedNames {
		if v == s {
			return n
		}
	}
	return fmt.Sprintf("sched(%d)", uint8(s))
}

// HashBuckets is the size of the sh/dh bucket table.
const HashBuckets = 256

// Hash8 is the datapath's sh/dh hash: the kernel's hash_32(ntohl(addr), 8).
func Hash8(a netip.Addr) int {
	b := a.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	return int((v * 0x61C88647) >> 24)
}

// Connection states (enum kdp_ct_state).
const (
	CTUDP    uint8 = 0
	CTTCPEst uint8 = 1
	CTTCPFin uint8 = 2
)

// LB stats kinds (enum kdp_lb_stats_kind).
const (
	StatsService uint32 = 1
	StatsBackend uint32 = 2
)

// SvcKey is struct lb_svc_key.
type SvcKey struct {
	_     structs.HostLayout
	VIP   [4]byte
	VPort [2]byte // network order
	Proto uint8
	Gen   uint8
	Slot  uint32 // 0 = master; else rev<<16 | index
}

// Svc is struct lb_svc: a master entry or a slot.
type Svc struct {
	_       structs.HostLayout
	ID      uint32 // master: service id; slot: real server id
	Count   uint32
	Rev     uint32
	Persist uint32
	PMask   [4]byte
	Sched   Scheduler
	Flags   uint8
	Pad     uint16
}

// Backend is struct lb_backend.
type Backend struct {
	_      structs.HostLayout
	IP     [4]byte
	Port   [2]byte // network order
	Weight uint16
}

// LBStatsKey is struct lb_stats_key.
type LBStatsKey struct {
	_    structs.HostLayout
	Kind uint32
	ID   uint32
}

// LBStats is struct lb_stats.
type LBStats struct {
	_        structs.HostLayout
	Conns    uint64
	InPkts   uint64
	OutPkts  uint64
	InBytes  uint64
	OutBytes uint64
	Active   int64
	Inactive int64
	Sched    uint64
}

// CTKey is struct ct_key.
type CTKey struct {
	_     structs.HostLayout
	SAddr [4]byte
	DAddr [4]byte
	SPort [2]byte
	DPort [2]byte
	Proto uint8
	Dir   uint8
	Pad   uint16
}

// CTEntry is struct ct_entry.
type CTEntry struct {
	_        structs.HostLayout
	LastSeen uint64
	Addr     [4]byte
	Port     [2]byte
	State    uint8
	Flags    uint8
	Backend  uint32
	Svc      uint32
}

// AffKey is struct aff_key.
type AffKey struct {
	_    structs.HostLayout
	Svc  uint32
	Addr [4]byte
}

// AffEntry is struct aff_entry.
type AffEntry struct {
	_        structs.HostLayout
	LastSeen uint64
	Backend  uint32
	Pad      uint32
}

// Port2 stores a port in network order.
func Port2(p uint16) [2]byte { return [2]byte{byte(p >> 8), byte(p)} }

// PortOf reads a port stored in network order.
func PortOf(b [2]byte) uint16 { return uint16(b[0])<<8 | uint16(b[1]) }

// LB is the load balancer's maps of one sandbox.
type LB struct {
	Svc     *ebpf.Map
	Backend *ebpf.Map
	Stats   *ebpf.Map
	CT      *ebpf.Map
	Aff     *ebpf.Map
	Config  *ebpf.Map
}

// ReadConfig reads the sandbox's config entry.
func ReadConfig(m *ebpf.Map) (Config, error) {
	var c Config
	if err := m.Lookup(uint32(0), &c); err != nil {
		return c, fmt.Errorf("read config: %w", err)
	}
	return c, nil
}

// WriteConfig writes the sandbox's config entry (one atomic map update).
func WriteConfig(m *ebpf.Map, c Config) error {
	if err := m.Update(uint32(0), &c, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write config: %w", err)
	}
	return nil
}

// ReadStats reads the counters of a service (StatsService) or real server (StatsBackend).
func (l LB) ReadStats(kind, id uint32) (LBStats, error) {
	var s LBStats
	err := l.Stats.Lookup(&LBStatsKey{Kind: kind, ID: id}, &s)
	if errors.Is(err, ebpf.ErrKeyNotExist) {
		return s, nil
	}
	return s, err
}
