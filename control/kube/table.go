package kube

import (
	"fmt"
	"hash/fnv"
	"maps"
	"net/netip"
	"slices"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

// The cluster table's ids: a range of their own, above every kata-ipvs id (kata-ipvs counts up
// from 1 and stops at ipvs.MaxID) and below the bit the datapath
// sets on lblc/lblcr destination-affinity keys (0x80000000), so neither kind of key collides.
const (
	IDBase  uint32 = ipvs.MaxID + 1
	IDLimit uint32 = 0x80000000
)

// Table is the cluster table: the virtual services of every translated Service, with ids.
// Service values are never changed once in the table (an update puts a new value in), so a
// Snapshot can be read while the table moves on. Not safe for concurrent use (the Syncer owns
// it).
type Table struct {
	max      int // rules (services + real servers) at most; 0 = no limit
	rules    int
	services map[ipvs.ServiceKey]*ipvs.Service
	owner    map[ipvs.ServiceKey]string   // namespace/name of the Service a key comes from
	keys     map[string][]ipvs.ServiceKey // the keys of each Service
	ids      map[uint32]string            // id -> what it names (for probing on collisions)
	idOf     map[string]uint32            // what -> id
	slots    []int32                      // how many ids hold each counter entry (ipvs.CounterSlot)
	skipped  map[string][]string          // namespace/name -> what was left out and why
}

// NewTable returns an empty cluster table holding at most maxRules rules (0: no limit).
func NewTable(maxRules int) *Table {
	return &Table{max: maxRules, services: map[ipvs.ServiceKey]*ipvs.Service{}, owner: map[ipvs.ServiceKey]string{},
		keys: map[string][]ipvs.ServiceKey{}, ids: map[uint32]string{}, idOf: map[string]uint32{}, skipped: map[string][]string{},
		slots: make([]int32, ipvs.CounterSlots)}
}

// Rules returns the number of rules in the table: services plus real servers.
func (t *Table) Rules() int { return t.rules }

// Len returns the number of virtual services.
func (t *Table) Len() int { return len(t.services) }

// Snapshot returns the table's services by key. The map is the caller's; the services must
// not be changed.
func (t *Table) Snapshot() map[ipvs.ServiceKey]*ipvs.Service { return maps.Clone(t.services) }

// Skipped returns, by Service, what was left out of the table and why.
func (t *Table) Skipped() map[string][]string {
	out := make(map[string][]string, len(t.skipped))
	for k, v := range t.skipped {
		out[k] = slices.Clone(v)
	}
	return out
}

// Owner returns the namespace/name of the Service key k comes from.
func (t *Table) Owner(k ipvs.ServiceKey) (string, bool) {
	o, ok := t.owner[k]
	return o, ok
}

// Update makes the table hold tr for the Service named name (namespace/name; an empty
// Translation removes it) and returns the keys whose service changed (added, changed or
// removed). A key that another Service already holds is left to it and reported in
// Skipped. When the result would exceed the table's limit nothing changes and the error
// wraps ErrTooManyRules.
func (t *Table) Update(name string, tr Translation) ([]ipvs.ServiceKey, error) {
	skipped := slices.Clone(tr.Skipped)
	want := map[ipvs.ServiceKey]ipvs.Service{}
	for _, s := range tr.Services {
		if o, ok := t.owner[s.ServiceKey]; ok && o != name {
			skipped = append(skipped, fmt.Sprintf("%s %s: already a virtual service of %s", s.Proto, s.Addr, o))
			continue
		}
		want[s.ServiceKey] = s
	}
	rules := t.rules + countRules(want)
	for _, k := range t.keys[name] {
		rules -= 1 + len(t.services[k].Servers)
	}
	if t.max > 0 && rules > t.max {
		return nil, fmt.Errorf("service %s: %d rules would make the table %d, above its limit of %d (--cluster-max-rules): %w",
			name, countRules(want), rules, t.max, ErrTooManyRules)
	}
	var changed []ipvs.ServiceKey
	for _, k := range t.keys[name] {
		if _, ok := want[k]; !ok {
			t.drop(k)
			changed = append(changed, k)
		}
	}
	var keys []ipvs.ServiceKey
	for _, s := range tr.Services {
		k := s.ServiceKey
		if _, ok := want[k]; !ok {
			continue
		}
		keys = append(keys, k)
		if old, ok := t.services[k]; ok && same(old, s) {
			continue
		}
		t.put(name, s)
		changed = append(changed, k)
	}
	t.rules = rules
	if len(keys) > 0 {
		t.keys[name] = keys
	} else {
		delete(t.keys, name)
	}
	if len(skipped) > 0 {
		t.skipped[name] = skipped
	} else {
		delete(t.skipped, name)
	}
	return changed, nil
}

func countRules(m map[ipvs.ServiceKey]ipvs.Service) int {
	n := 0
	for _, s := range m {
		n += 1 + len(s.Servers)
	}
	return n
}

// same reports whether s would program what old does (ids aside: they follow from the rest).
func same(old *ipvs.Service, s ipvs.Service) bool {
	if old.Scheduler != s.Scheduler || old.Persistent != s.Persistent || old.Netmask != s.Netmask || len(old.Servers) != len(s.Servers) {
		return false
	}
	for i := range s.Servers {
		if old.Servers[i].Addr != s.Servers[i].Addr || old.Servers[i].Weight != s.Servers[i].Weight {
			return false
		}
	}
	return true
}

// put stores a new value for s's key, with ids: the service keeps its id, a real server that
// stays keeps its id, new ones get theirs.
func (t *Table) put(name string, s ipvs.Service) {
	k := s.ServiceKey
	n := s // a copy: the caller's slice is not ours
	n.Servers = slices.Clone(s.Servers)
	n.ID = t.id("svc|" + k.String())
	keep := map[string]bool{}
	for i := range n.Servers {
		what := serverName(k, n.Servers[i].Addr)
		n.Servers[i].ID = t.id(what)
		keep[what] = true
	}
	if old, ok := t.services[k]; ok {
		for _, d := range old.Servers {
			if what := serverName(k, d.Addr); !keep[what] {
				t.release(what)
			}
		}
	}
	t.services[k] = &n
	t.owner[k] = name
}

// serverName is what the id of real server a of service k names (see id).
func serverName(k ipvs.ServiceKey, a netip.AddrPort) string {
	return "be|" + k.String() + "|" + a.String()
}

func (t *Table) drop(k ipvs.ServiceKey) {
	if old, ok := t.services[k]; ok {
		for _, d := range old.Servers {
			t.release(serverName(k, d.Addr))
		}
	}
	t.release("svc|" + k.String())
	delete(t.services, k)
	delete(t.owner, k)
}

// id returns the id of what: the one it has, or a new one derived from its hash (the next
// free one after it when another holds it), so the same table gets the same ids in every run.
// An id is free when no id of the table holds it or its counter entry (ipvs.CounterSlot: the
// cluster table's ids have the second half of the datapath's counter arrays, where each entry
// counts for one id, bpf/lib/lb.h lb_cnt_slot). A table of more ids than entries (only
// without a rule limit) gives the rest ids that share entries: their counters are not kept.
func (t *Table) id(what string) uint32 {
	if id, ok := t.idOf[what]; ok {
		return id
	}
	h := fnv.New64a()
	h.Write([]byte(what))
	span := uint64(IDLimit - IDBase)
	off := h.Sum64() % span
	full := len(t.ids) >= ipvs.CounterSlots
	for {
		id := IDBase + uint32(off)
		if _, taken := t.ids[id]; !taken && (full || t.slots[ipvs.CounterSlot(id)] == 0) {
			t.ids[id] = what
			t.idOf[what] = id
			t.slots[ipvs.CounterSlot(id)]++
			return id
		}
		off = (off + 1) % span
	}
}

func (t *Table) release(what string) {
	if id, ok := t.idOf[what]; ok {
		delete(t.ids, id)
		delete(t.idOf, what)
		t.slots[ipvs.CounterSlot(id)]--
	}
}

// DefaultMaxRules is the cluster table's default limit: as many rules as kata-ipvs allows
// a sandbox (5000 services with 3 endpoints each).
const DefaultMaxRules = 20000
