package ipvs

import (
	"net/netip"
	"slices"
)

// Server is a real server of a virtual service.
type Server struct {
	// ID is assigned at creation and never reused while the table lives;
	// the datapath keys its backend entries and counters by it. Ids start
	// at 1: 0 is never a rule's id, so it can stand for "none".
	ID     uint32         `json:"id"`
	Addr   netip.AddrPort `json:"addr"`
	Weight int            `json:"weight"`
}

// Service is a virtual service with its real servers.
type Service struct {
	// ID is assigned at creation and never reused while the table lives.
	// Service and server ids come from one counter, so they never collide.
	ID uint32 `json:"id"`
	ServiceKey
	Scheduler string `json:"scheduler"`
	// Persistent is the persistence timeout in seconds, 0 for none.
	Persistent uint32 `json:"persistent,omitempty"`
	// Netmask is the persistence granularity: clients whose addresses
	// agree under it share a real server (see PersistenceKey).
	Netmask netip.Addr `json:"netmask"`
	// Servers are in kernel order: newest first. Schedulers break ties in
	// this order.
	Servers []Server `json:"servers"`
}

// clone returns a deep copy of s.
func (s *Service) clone() *Service {
	c := *s
	c.Servers = slices.Clone(s.Servers)
	return &c
}

func (s *Service) server(a netip.AddrPort) int {
	for i := range s.Servers {
		if s.Servers[i].Addr == a {
			return i
		}
	}
	return -1
}

// Table is the IPVS rule table of one sandbox: what ipvsadm would see in
// the kernel. It is plain data, serializable with encoding/json for the
// agent's store; the zero value is an empty table with the default
// timeouts. A Table is not safe for concurrent use: its owner serializes
// calls (the agent holds a lock per sandbox).
type Table struct {
	// Services in creation order (the listing sorts them).
	Services []*Service `json:"services"`
	// Timeouts; a zero value means IPVS's default (see Timeouts method).
	ConnTimeouts Timeouts `json:"timeouts"`
	// LastID is the last id handed out; the next is LastID+1.
	LastID uint32 `json:"lastID"`

	index map[ServiceKey]*Service // built lazily, nil after Unmarshal/Clone
	rules int
	// While Restore runs: the services it adds and their real servers are carved out of these
	// (two allocations instead of one per service and two or three per real server), and
	// nextServers is how many real servers the next service added gets room for.
	svcSlab     []Service
	srvSlab     []Server
	nextServers int
	// slots marks the counter entries (CounterSlot) that live ids hold, for newID; nil when
	// not built yet or dropped by a removal (rebuilt at the next newID).
	slots []bool
}

// Timeouts returns the connection timeouts in force.
func (t *Table) Timeouts() Timeouts {
	c := t.ConnTimeouts
	if c.TCP == 0 {
		c.TCP = DefaultTimeouts.TCP
	}
	if c.TCPFin == 0 {
		c.TCPFin = DefaultTimeouts.TCPFin
	}
	if c.UDP == 0 {
		c.UDP = DefaultTimeouts.UDP
	}
	return c
}

// idx returns the service index, building it (and the rule count) after
// decoding or cloning.
func (t *Table) idx() map[ServiceKey]*Service {
	if t.index == nil {
		t.index = make(map[ServiceKey]*Service, len(t.Services))
		t.rules = 0
		for _, s := range t.Services {
			t.index[s.ServiceKey] = s
			t.rules += 1 + len(s.Servers)
			t.LastID = max(t.LastID, s.ID)
			for _, d := range s.Servers {
				t.LastID = max(t.LastID, d.ID)
			}
		}
	}
	return t.index
}

// Rules returns the number of rules: services plus real servers.
func (t *Table) Rules() int {
	t.idx()
	return t.rules
}

// Service returns a copy of the service with key k.
func (t *Table) Service(k ServiceKey) (Service, bool) {
	s, ok := t.idx()[k]
	if !ok {
		return Service{}, false
	}
	return *s.clone(), true
}

// Clone returns a deep copy of t.
func (t *Table) Clone() *Table {
	c := &Table{ConnTimeouts: t.ConnTimeouts, LastID: t.LastID}
	if t.Services != nil {
		c.Services = make([]*Service, len(t.Services))
		for i, s := range t.Services {
			c.Services[i] = s.clone()
		}
	}
	return c
}

// Clear removes every service and real server; timeouts and the id
// counter stay.
func (t *Table) Clear() {
	t.Services = nil
	t.index = map[ServiceKey]*Service{}
	t.rules = 0
	t.slots = nil
}

// MaxID is the largest id a table gives out: the ids above it belong to the cluster table
// (control/kube, which shares the sandbox's datapath) and, from 0x80000000, to the bit the
// datapath sets on lblc/lblcr affinity keys.
const MaxID uint32 = 0x3fffffff

// newService returns room for a service: the next of Restore's slab, else a new one.
func (t *Table) newService() *Service {
	if len(t.svcSlab) == 0 {
		return new(Service)
	}
	s := &t.svcSlab[0]
	t.svcSlab = t.svcSlab[1:]
	return s
}

// newServers returns an empty list of real servers for a new service: with room for
// nextServers of them from Restore's slab, else none (not nil: a service's list encodes as []).
func (t *Table) newServers() []Server {
	n := min(t.nextServers, len(t.srvSlab))
	t.nextServers = 0
	if n == 0 {
		return []Server{}
	}
	l := t.srvSlab[:0:n]
	t.srvSlab = t.srvSlab[n:]
	return l
}

// CounterSlots is how many counter entries a table's ids map to: KDP_LB_CNT_HALF
// (bpf/lib/lb.h), the half of the datapath's counter arrays that kata-ipvs ids use. It is
// larger than MaxRules, so a table always has a free one.
const CounterSlots = 20480

// CounterSlot is the counter entry of a kata-ipvs id (the datapath's lb_cnt_slot).
func CounterSlot(id uint32) uint32 { return id % CounterSlots }

// newID hands out the next id: the first after LastID whose counter entry (CounterSlot) no
// live id of the table holds. The datapath keeps each id's counters in the entry of its slot,
// owned by one id at a time (bpf/lib/lb.h, lb_cnt_slot), so live ids must never share one; ids
// are still never reused, as LastID only grows. Ids taken in order mostly find their slot
// free at once: a table's live ids are at most MaxRules of CounterSlots slots.
func (t *Table) newID() (uint32, bool) {
	if t.slots == nil {
		t.slots = make([]bool, CounterSlots)
		for _, s := range t.Services {
			t.slots[CounterSlot(s.ID)] = true
			for _, d := range s.Servers {
				t.slots[CounterSlot(d.ID)] = true
			}
		}
	}
	for id := t.LastID + 1; id <= MaxID && id-t.LastID <= CounterSlots; id++ {
		if !t.slots[CounterSlot(id)] {
			t.slots[CounterSlot(id)] = true
			t.LastID = id
			return id, true
		}
	}
	return 0, false
}

// Apply executes one command, as ipvsadm would against the kernel, and
// returns what ipvsadm prints on stdout (listings; nothing for changes).
// Counts in listings are zero; use Exec to supply live counters. The
// command is checked completely before the table changes: a failed
// command changes nothing.
func (t *Table) Apply(cmd Command) (stdout string, err error) {
	return t.Exec(cmd, nil)
}

// Exec is Apply with the live counters of the datapath (nil: zeros).
func (t *Table) Exec(cmd Command, c Counters) (stdout string, err error) {
	idx := t.idx()
	if (cmd.Op == OpAddService || cmd.Op == OpEditService) && cmd.Scheduler == "" {
		cmd.Scheduler = DefaultScheduler // as ipvsadm, for hand-built commands
	}
	switch cmd.Op {
	case OpAddService:
		if _, ok := idx[cmd.Service]; ok {
			return "", failErr(ErrServiceExists, cmd.Service.String())
		}
		if err := checkService(cmd); err != nil {
			return "", err
		}
		if t.rules+1 > MaxRules {
			return "", failErr(ErrRuleLimit, cmd.Service.String())
		}
		id, ok := t.newID()
		if !ok {
			return "", failErr(ErrIDSpace, cmd.Service.String())
		}
		s := t.newService()
		*s = Service{ID: id, ServiceKey: cmd.Service, Scheduler: cmd.Scheduler,
			Persistent: cmd.Persistent, Netmask: netmaskOf(cmd), Servers: t.newServers()}
		t.Services = append(t.Services, s)
		idx[s.ServiceKey] = s
		t.rules++
	case OpEditService:
		s, ok := idx[cmd.Service]
		if !ok {
			return "", failErr(ErrNoService, cmd.Service.String())
		}
		if err := checkService(cmd); err != nil {
			return "", err
		}
		s.Scheduler, s.Persistent, s.Netmask = cmd.Scheduler, cmd.Persistent, netmaskOf(cmd)
	case OpDeleteService:
		s, ok := idx[cmd.Service]
		if !ok {
			return "", failErr(ErrNoService, cmd.Service.String())
		}
		i := slices.Index(t.Services, s)
		t.Services = slices.Delete(t.Services, i, i+1)
		delete(idx, cmd.Service)
		t.slots = nil
		t.rules -= 1 + len(s.Servers)
	case OpAddServer:
		s, ok := idx[cmd.Service]
		if !ok {
			return "", failErr(ErrServiceNotDefined, cmd.Service.String())
		}
		if s.server(cmd.Server) >= 0 {
			return "", failErr(ErrDestExists, cmd.Server.String())
		}
		if err := checkServer(cmd); err != nil {
			return "", err
		}
		if t.rules+1 > MaxRules {
			return "", failErr(ErrRuleLimit, cmd.Server.String())
		}
		id, ok := t.newID()
		if !ok {
			return "", failErr(ErrIDSpace, cmd.Server.String())
		}
		s.Servers = slices.Insert(s.Servers, 0, Server{ID: id, Addr: cmd.Server, Weight: cmd.Weight})
		t.rules++
	case OpEditServer, OpDeleteServer:
		s, ok := idx[cmd.Service]
		if !ok {
			return "", failErr(ErrServiceNotDefined, cmd.Service.String())
		}
		i := s.server(cmd.Server)
		if i < 0 {
			return "", failErr(ErrNoDest, cmd.Server.String())
		}
		if cmd.Op == OpDeleteServer {
			s.Servers = slices.Delete(s.Servers, i, i+1)
			t.slots = nil
			t.rules--
			break
		}
		if err := checkServer(cmd); err != nil {
			return "", err
		}
		s.Servers[i].Weight = cmd.Weight
	case OpClear:
		t.Clear()
	case OpSet:
		to := cmd.Timeouts
		if to.TCP > MaxTimeout || to.TCPFin > MaxTimeout || to.UDP > MaxTimeout {
			return "", usageErr("--set", "invalid timeout value specified")
		}
		cur := t.Timeouts()
		if to.TCP != 0 {
			cur.TCP = to.TCP
		}
		if to.TCPFin != 0 {
			cur.TCPFin = to.TCPFin
		}
		if to.UDP != 0 {
			cur.UDP = to.UDP
		}
		t.ConnTimeouts = cur
	case OpList:
		if cmd.Timeout {
			return t.ListTimeout(), nil
		}
		if cmd.HasService {
			return t.ListService(cmd.Service, format(cmd), c)
		}
		return t.List(format(cmd), c), nil
	case OpSave:
		return t.Save(), nil
	default:
		return "", usageErr(cmd.Op.String(), "unsupported command")
	}
	return "", nil
}

// checkService validates what the kernel checks of a service's parameters
// (and what a hand-built Command may get wrong).
func checkService(cmd Command) error {
	if !knownScheduler(cmd.Scheduler) {
		return failErr(ErrSchedulerNotFound, cmd.Scheduler)
	}
	if p := cmd.Service.Proto; p != TCP && p != UDP {
		return usageErr(cmd.Service.String(), "illegal virtual server address[:port] specified")
	}
	if a := cmd.Service.Addr; !a.Addr().IsValid() || a.Addr().Is4In6() || a.Addr().Zone() != "" || a.Port() == 0 {
		return usageErr(cmd.Service.String(), "illegal virtual server address[:port] specified")
	}
	if cmd.Persistent > MaxPersistent {
		return usageErr("-p", "invalid timeout value `%d' specified", cmd.Persistent)
	}
	if m := cmd.Netmask; m.IsValid() && m.BitLen() != cmd.Service.Addr.Addr().BitLen() {
		return usageErr(m.String(), "illegal virtual server persistent mask specified")
	}
	return nil
}

func netmaskOf(cmd Command) netip.Addr {
	if cmd.Netmask.IsValid() {
		return cmd.Netmask
	}
	return hostMaskOf(cmd.Service.Addr.Addr())
}

// checkServer validates a real server as the kernel does (it must be a
// unicast address: ip_vs_new_dest refuses others with EINVAL) and as
// ipvsadm does (NAT needs the service's address family).
func checkServer(cmd Command) error {
	a := cmd.Server.Addr()
	if !a.IsValid() || a.Is4In6() || a.Zone() != "" || cmd.Server.Port() == 0 {
		return usageErr(cmd.Server.String(), "illegal real server address[:port] specified")
	}
	if a.Is4() != cmd.Service.Addr.Addr().Is4() {
		return usageErr(cmd.Server.String(), "Different address family is allowed only for tunneling servers")
	}
	if a.IsUnspecified() || a.IsMulticast() || (a.Is4() && (a.AsSlice()[0] == 0 || a == hostMask)) {
		return failErr(ErrInvalid, cmd.Server.String())
	}
	if cmd.Weight < 0 || cmd.Weight > MaxWeight {
		return usageErr("-w", "illegal weight specified")
	}
	return nil
}

// Restore replaces the rules of an empty table with the commands of cmds, one run after the
// other (from ParseRestore, or the runs of ParseRestoreChunks), all or nothing: the commands
// are applied to a scratch table and that is switched in only if every one succeeds. Errors
// name the line. The table must hold no rule.
func (t *Table) Restore(cmds ...[]Command) error {
	if t.Rules() > 0 {
		return failErr(ErrNotEmpty, "--restore -")
	}
	adds, svcs := 0, 0
	for _, cs := range cmds {
		for _, c := range cs {
			switch c.Op {
			case OpAddService:
				adds++
				svcs++
			case OpAddServer:
				adds++
			}
		}
	}
	if adds == 0 {
		return &Error{Kind: ErrEmptyRestore, Msg: ErrEmptyRestore.Error(), Token: "--restore -", Code: ExitUsage}
	}
	// Sized for the services added, so neither grows (and copies) on the way; the services
	// and their real servers come from two slabs (see Table.svcSlab).
	n := &Table{ConnTimeouts: t.ConnTimeouts, LastID: t.LastID,
		Services: make([]*Service, 0, svcs), index: make(map[ServiceKey]*Service, svcs),
		svcSlab: make([]Service, svcs), srvSlab: make([]Server, adds-svcs)}
	for i, cs := range cmds {
		for j, c := range cs {
			if !c.Op.Mutates() {
				return atLine(&Error{Kind: ErrNotInRestore, Msg: ErrNotInRestore.Error(), Token: c.Op.String(), Code: ExitUsage}, c.Line)
			}
			if c.Op == OpAddService {
				// ipvsadm-save writes a service's real servers right after it: room for those.
				n.nextServers = serversAfter(cmds, i, j+1, c.Service)
			}
			if _, err := n.Exec(c, nil); err != nil {
				return atLine(err, c.Line)
			}
		}
	}
	n.svcSlab, n.srvSlab, n.nextServers = nil, nil, 0
	*t = *n
	return nil
}

// serversAfter counts the add-server commands for service k that follow cmds[i][j] without
// another command in between.
func serversAfter(cmds [][]Command, i, j int, k ServiceKey) int {
	n := 0
	for ; i < len(cmds); i, j = i+1, 0 {
		for _, c := range cmds[i][j:] {
			if c.Op != OpAddServer || c.Service != k {
				return n
			}
			n++
		}
	}
	return n
}

// SnapshotService records the service with key k (or its absence) and returns a function that
// puts it back exactly: same contents, same place in the table, same rule count. It lets a
// caller apply a command to the live table and undo it when a later step (the datapath, the
// store) fails, without copying the whole table first.
func (t *Table) SnapshotService(k ServiceKey) (undo func()) {
	idx := t.idx()
	old, existed := idx[k]
	pos := -1
	var saved *Service
	if existed {
		pos = slices.Index(t.Services, old)
		saved = old.clone()
	}
	return func() {
		idx := t.idx()
		if cur, ok := idx[k]; ok {
			i := slices.Index(t.Services, cur)
			t.Services = slices.Delete(t.Services, i, i+1)
			t.rules -= 1 + len(cur.Servers)
			delete(idx, k)
			t.slots = nil
		}
		if !existed {
			return
		}
		s := saved.clone()
		pos := min(pos, len(t.Services))
		t.Services = slices.Insert(t.Services, pos, s)
		t.rules += 1 + len(s.Servers)
		idx[k] = s
	}
}
