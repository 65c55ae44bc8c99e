package loader

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"

	"github.com/cilium/ebpf"
)

// migrateSuffix names the pin a migrated map gets before it is renamed over the old one.
// bpffs refuses names with a dot, hence the underscore.
const migrateSuffix = "_migrating"

// migratePinned replaces every map pinned in dir that this build's spec cannot reuse (its
// type, flags, key or value size changed between kata-dp versions) by a new map made from
// the spec, so that an agent upgraded across such a change still opens the sandboxes an
// earlier version pinned instead of failing with ErrMapIncompatible.
//
// The new map gets the entries of the old one where their layout is unchanged (same key and
// value size: a hash whose flags or type changed, a hash that became an array indexed by the
// same u32 keys); entries that do not fit are counted and dropped. The IPv4 connection table
// of an earlier layout is converted under its new name first (migrateCTPin): established
// connections survive the upgrade; so do the load balancer's counters, moved from the hash
// maps of earlier versions into arrays (convertCounters), and the service maps from before the
// slots moved into the masters (svcConversion): new connections stay balanced. A map whose
// layout did
// change starts empty, and its owner writes it again: the agent's reconcile rewrites every
// endpoint, route and load-balancer entry at start. The old map lives on while the programs
// pinned in links still use it; Open moves the links onto the new programs right after, so
// entries the old programs write in that moment (a new connection, a counter) are lost.
//
// Each map is switched atomically: the new one is pinned under a temporary name, then renamed
// over the old pin. A crash in between leaves the old pin (and the temporary one, removed
// first thing), and the next open migrates it again.
func migratePinned(spec *ebpf.CollectionSpec, dir string) error {
	left, err := filepath.Glob(filepath.Join(dir, "*"+migrateSuffix))
	if err != nil {
		return fmt.Errorf("migrate pinned maps: %w", err)
	}
	for _, p := range left {
		if err := os.Remove(p); err != nil {
			return fmt.Errorf("migrate pinned maps: remove the leftover %s: %w", p, err)
		}
	}
	if err := migrateCTPin(spec, dir); err != nil {
		return fmt.Errorf("migrate the connection table: %w", err)
	}
	names := make([]string, 0, len(spec.Maps))
	for name, ms := range spec.Maps {
		if ms.Pinning == ebpf.PinByName {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	svcs, err := readOldServices(dir)
	if err != nil {
		return fmt.Errorf("migrate pinned maps: %w", err)
	}
	for _, name := range names {
		if err := migrateMap(spec.Maps[name], filepath.Join(dir, name), svcs); err != nil {
			return fmt.Errorf("migrate pinned map %s: %w", name, err)
		}
	}
	return nil
}

// migrateMap replaces the map pinned at path if ms cannot reuse it; see migratePinned. svcs,
// when not nil, converts the service maps of the older layout.
func migrateMap(ms *ebpf.MapSpec, path string, svcs *svcConversion) error {
	old, err := ebpf.LoadPinnedMap(path, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer old.Close()
	why := ms.Compatible(old)
	if why == nil {
		return nil
	}
	ns := ms.Copy()
	ns.Pinning = ebpf.PinNone
	m, err := ebpf.NewMap(ns)
	if err != nil {
		return fmt.Errorf("create the new map: %w", err)
	}
	defer m.Close()
	fill := copyEntries
	name := filepath.Base(path)
	if isOldCounters(name, old) {
		fill = convertCounters // the counters' hash maps became arrays: the counts carry over
	}
	if svcs != nil && old.ValueSize() == oldLbSvcSize && (name == "kdp_lb_svc" || name == "kdp_lb_svc6") {
		// The service maps before the slots moved into the masters: converted, so the
		// services stay balanced until the agent's first sync writes them again.
		fill = func(_, m *ebpf.Map) (int, int, error) { return svcs.convert(name, m) }
	}
	copied, dropped, err := fill(old, m)
	if err != nil {
		return fmt.Errorf("copy entries: %w", err)
	}
	tmp := path + migrateSuffix
	if err := m.Pin(tmp); err != nil {
		return fmt.Errorf("pin the new map: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("replace the old pin: %w", err)
	}
	slog.Info("migrated a pinned map to this version's definition", "map", path, "change", why.Error(),
		"entries_copied", copied, "entries_dropped", dropped)
	return nil
}

// migrateCTPin moves an IPv4 connection table that an earlier agent pinned in dir as oldCTPin
// (any of oldCTLayout's layouts) into a new table of spec's layout pinned as CTPin, with the
// same capacity in entries (convertCT; spec's CTPin takes its size), and removes the old pin. The new pin is the commit
// point: it is made under a temporary name and renamed into place, and only then is the old
// one removed, so a crash before the rename leaves the old pin to migrate again, and one
// after it leaves both, of which the next open removes the old. The programs pinned in links
// write into the old table until Open moves the links onto the new programs: a connection
// they make in that moment is lost, as in migrateMap.
func migrateCTPin(spec *ebpf.CollectionSpec, dir string) error {
	oldPath, path := filepath.Join(dir, oldCTPin), filepath.Join(dir, CTPin)
	old, err := ebpf.LoadPinnedMap(oldPath, nil)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open %s: %w", oldCTPin, err)
	}
	defer old.Close()
	if _, err := os.Stat(path); err == nil {
		// Migrated, but not yet unpinned: a crash between the two.
		if err := os.Remove(oldPath); err != nil {
			return fmt.Errorf("remove the migrated %s: %w", oldCTPin, err)
		}
		return nil
	}
	layout, entries := oldCTLayout(old)
	if layout == "" {
		return fmt.Errorf("%s of an unknown layout (%s, key %d, value %d bytes)", oldCTPin, old.Type(), old.KeySize(), old.ValueSize())
	}
	ms, ok := spec.Maps[CTPin]
	if !ok {
		return fmt.Errorf("the datapath has no map %s", CTPin)
	}
	ns := ms.Copy()
	ns.Pinning = ebpf.PinNone
	ns.MaxEntries = ctBuckets(entries)
	m, err := ebpf.NewMap(ns)
	if err != nil {
		return fmt.Errorf("create %s: %w", CTPin, err)
	}
	defer m.Close()
	copied, dropped, err := convertCT(old, m)
	if err != nil {
		return fmt.Errorf("convert %s (%s): %w", oldCTPin, layout, err)
	}
	tmp := path + migrateSuffix
	if err := m.Pin(tmp); err != nil {
		return fmt.Errorf("pin %s: %w", CTPin, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("pin %s: %w", CTPin, err)
	}
	ms.MaxEntries = ns.MaxEntries
	if err := os.Remove(oldPath); err != nil {
		return fmt.Errorf("remove the migrated %s: %w", oldCTPin, err)
	}
	slog.Info("migrated the connection table to this version's layout", "from", oldPath, "layout", layout,
		"to", path, "entries_copied", copied, "entries_dropped", dropped)
	return nil
}

// copyEntries puts every entry of old into m when both have the same key and value sizes and
// both or neither keep a value per CPU; otherwise it copies nothing and drops them all. An
// entry m refuses (a key beyond an array's end, a full map) is dropped; so are the all-zero
// slots of an array copied into a hash, which were never entries.
func copyEntries(old, m *ebpf.Map) (copied, dropped int, err error) {
	same := copyable(m.Type()) && old.KeySize() == m.KeySize() && old.ValueSize() == m.ValueSize() &&
		perCPU(old.Type()) == perCPU(m.Type())
	skipZero := isArray(old.Type()) && !isArray(m.Type())
	err = eachEntry(old, func(key []byte, value any) {
		switch {
		case !same:
			dropped++
		case skipZero && allZero(value):
		case m.Put(key, value) != nil:
			dropped++
		default:
			copied++
		}
	})
	return copied, dropped, err
}

// eachEntry calls f with every entry of m (an array's every slot): the key as bytes, the value
// as bytes or, for a map with a value per CPU, as one byte array per possible CPU, the layout
// the library reads and writes for such maps. A map whose entries are not plain data (a ring
// buffer, a program array) has none.
func eachEntry(m *ebpf.Map, f func(key []byte, value any)) error {
	if !copyable(m.Type()) {
		return nil
	}
	key := make([]byte, m.KeySize())
	var out any
	get := func() any { return out }
	if perCPU(m.Type()) {
		p := reflect.New(reflect.SliceOf(reflect.ArrayOf(int(m.ValueSize()), reflect.TypeFor[byte]())))
		out, get = p.Interface(), func() any { return p.Elem().Interface() }
	} else {
		out = make([]byte, m.ValueSize())
	}
	it := m.Iterate()
	for it.Next(key, out) {
		f(key, get())
	}
	return it.Err()
}

// copyable reports whether entries of a map of type t can be read and written as plain bytes.
func copyable(t ebpf.MapType) bool {
	switch t {
	case ebpf.Hash, ebpf.LRUHash, ebpf.PerCPUHash, ebpf.LRUCPUHash, ebpf.Array, ebpf.PerCPUArray, ebpf.LPMTrie:
		return true
	}
	return false
}

func perCPU(t ebpf.MapType) bool {
	return t == ebpf.PerCPUHash || t == ebpf.LRUCPUHash || t == ebpf.PerCPUArray
}

func isArray(t ebpf.MapType) bool { return t == ebpf.Array || t == ebpf.PerCPUArray }

// allZero reports whether v, a []byte or a slice of byte arrays, holds only zero bytes.
func allZero(v any) bool {
	rv := reflect.ValueOf(v)
	if b, ok := v.([]byte); ok {
		return !slices.ContainsFunc(b, func(c byte) bool { return c != 0 })
	}
	for i := range rv.Len() {
		if !rv.Index(i).IsZero() {
			return false
		}
	}
	return true
}
