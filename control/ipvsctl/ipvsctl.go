// Package ipvsctl runs kata-ipvs for the agent: it keeps each sandbox's IPVS rule table
// (control/ipvs), persists it, and hands every change to the sandbox's BPF load balancer.
//
// A command is validated and applied to a copy of the table first; only when the datapath took
// the copy and the store saved it does the copy become the table, so a failed command changes
// nothing. A restore is validated whole and switched in at once by the dataplane. After an
// agent restart the saved tables are loaded and pushed again (the dataplane rebuilds them under
// a new generation and switches atomically, so the rules in force never flicker).
//
// A Manager is safe for concurrent use; commands for one sandbox are serialised.
package ipvsctl

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"runtime/debug"
	"slices"
	"sync"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/store"
)

// LB is what the manager needs of the dataplane (control/dataplane implements it).
type LB interface {
	SetLB(ctx context.Context, sandbox string, t *ipvs.Table) error
	RestoreLB(ctx context.Context, sandbox string, t *ipvs.Table) error
	LBCounters(ctx context.Context, sandbox string) (ipvs.Counters, error)
	CleanupConns(ctx context.Context, sandbox string, dst netip.Addr, proto uint8) (int, error)
}

// ServiceLB is implemented by dataplanes that can apply a change confined to one service
// without comparing the whole table (control/dataplane does): edits then cost the same at 20000
// rules as at one.
type ServiceLB interface {
	SetLBService(ctx context.Context, sandbox string, t *ipvs.Table, k ipvs.ServiceKey) error
}

// Store persists one table per sandbox (control/store implements it).
type Store interface {
	Put(key string, data []byte) error
	Delete(key string) error
	Load() (map[string][]byte, error)
}

// Journal is implemented by stores that keep a log of small changes beside each value
// (control/store does). With it an edit confined to one service appends one record (a few
// bytes, one fsync) instead of saving the whole table (about 2 MB of JSON at 20000 rules):
// that save, not the datapath, was what made an edit at 20000 rules take 15 ms. The table is
// written whole on the first save of a sandbox, by commands that change more than one service
// (--restore, --clear, --set), and after JournalMax records.
type Journal interface {
	Append(key string, rec []byte) error
	Journal(key string) ([][]byte, error)
	DropJournal(key string) error
}

// JournalMax is how many records a sandbox's journal takes before the table is written whole
// again: it bounds the replay at start (a record replays in microseconds) and the disk used.
const JournalMax = 1000

// snapshot is a table as saved whole: the table and the sequence number of the last journal
// record it includes (records up to it are skipped on replay, so a crash between writing the
// snapshot and dropping the journal replays nothing twice).
type snapshot struct {
	*ipvs.Table
	Seq uint64 `json:"journalSeq,omitempty"`
}

// record is one journaled edit: the kata-ipvs parameters that were applied.
type record struct {
	Seq    uint64 `json:"seq"`
	Params string `json:"params"`
}

// onDisk is what the manager knows of a sandbox's table on disk.
type onDisk struct {
	snapshot bool   // a snapshot exists (records may be journaled after it)
	seq      uint64 // the last sequence number written
	records  int    // records in the journal since the last snapshot
}

// Resolver finds a sandbox by id or unique id prefix and checks it is healthy (control's
// Controller.Health).
type Resolver func(ctx context.Context, id string) (control.Sandbox, error)

// Errors callers can test for.
var (
	// ErrRestoreNotEmpty refuses a restore into a sandbox that has rules.
	ErrRestoreNotEmpty = errors.New("restore refused: the sandbox has rules (run --clear first)")
)

// Manager owns the rule tables of all sandboxes.
type Manager struct {
	lb      LB
	store   Store
	resolve Resolver
	log     *slog.Logger

	mu     sync.Mutex
	tables map[string]*ipvs.Table
	locks  map[string]*sync.Mutex
	disk   map[string]onDisk // written under the sandbox's lock, read and written under mu
}

// New loads the saved tables and pushes each to the dataplane (sandboxes that no longer exist
// are forgotten). One sandbox's rules must not keep the agent down: a table the dataplane
// cannot take (the sandbox could not be re-adopted, e.g. its netns vanished while the agent was
// down) is logged and kept, saved, until the sandbox is deleted (Forget); a saved table that
// cannot be decoded is moved aside when the store can (MoveAside) and logged.
func New(ctx context.Context, lb LB, st Store, resolve Resolver, sandboxes []control.Sandbox, log *slog.Logger) (*Manager, error) {
	if log == nil {
		log = slog.Default()
	}
	m := &Manager{lb: lb, store: st, resolve: resolve, log: log, tables: map[string]*ipvs.Table{}, locks: map[string]*sync.Mutex{}, disk: map[string]onDisk{}}
	saved, err := st.Load()
	if err != nil {
		return nil, fmt.Errorf("kata-ipvs: load rules: %w", err)
	}
	known := map[string]bool{}
	for _, sb := range sandboxes {
		known[sb.ID] = true
	}
	for id, b := range saved {
		if !known[id] {
			st.Delete(id)
			continue
		}
		snap := snapshot{Table: &ipvs.Table{}}
		if err := json.Unmarshal(b, &snap); err != nil {
			where := "left in place"
			if q, ok := st.(interface{ MoveAside(string) (string, error) }); ok {
				if to, merr := q.MoveAside(id); merr != nil {
					where = "could not move it aside: " + merr.Error()
				} else {
					where = "moved to " + to
				}
			}
			log.Error("kata-ipvs: saved rules unreadable; the sandbox starts without them", "sandbox", id, "err", err, "file", where)
			// Its journal goes too: its records continue a table that is no more.
			if j, ok := st.(Journal); ok {
				if err := j.DropJournal(id); err != nil {
					log.Error("kata-ipvs: drop the journal of unreadable rules", "sandbox", id, "err", err)
				}
			}
			continue
		}
		t := snap.Table
		m.disk[id] = onDisk{snapshot: true, seq: snap.Seq}
		m.replay(id, t, snap.Seq)
		m.tables[id] = t
		if err := lb.RestoreLB(ctx, id, t); err != nil {
			log.Error("kata-ipvs: cannot reinstall the saved rules; kept until the sandbox is deleted", "sandbox", id, "err", err)
		}
	}
	return m, nil
}

func (m *Manager) lock(id string) (*ipvs.Table, func()) {
	m.mu.Lock()
	l, ok := m.locks[id]
	if !ok {
		l = &sync.Mutex{}
		m.locks[id] = l
	}
	m.mu.Unlock()
	l.Lock()
	m.mu.Lock()
	t := m.tables[id]
	if t == nil {
		t = &ipvs.Table{}
	}
	m.mu.Unlock()
	return t, l.Unlock
}

// commit makes next the sandbox's table: the dataplane first, then the store. If the store
// fails, the dataplane is put back to the old table.
func (m *Manager) commit(ctx context.Context, id string, old, next *ipvs.Table, restore bool) error {
	push := m.lb.SetLB
	if restore {
		push = m.lb.RestoreLB
	}
	// Encoding the table (about 8 ms of CPU for 20000 rules) and, with a store that stages,
	// writing and flushing it (1.5-7 ms for the 1.2 MB) need nothing of the push: they run
	// beside it, on the other CPU, while the push mostly waits on the kernel's map updates.
	// Only the commit (a flush of one block) waits for the push, so nothing is saved that the
	// dataplane refused.
	enc := m.encodeAsync(id, next)
	if err := push(ctx, id, next); err != nil {
		if e := <-enc; e.staged != nil {
			e.staged.Abort()
		}
		if rerr := m.lb.RestoreLB(ctx, id, old); rerr != nil {
			m.log.Error("kata-ipvs: could not put the old rules back", "sandbox", id, "err", rerr)
		}
		return err
	}
	if err := m.saveEncoded(id, <-enc); err != nil {
		if rerr := m.lb.RestoreLB(ctx, id, old); rerr != nil {
			m.log.Error("kata-ipvs: could not put the old rules back", "sandbox", id, "err", rerr)
		}
		return err
	}
	m.mu.Lock()
	m.tables[id] = next
	m.mu.Unlock()
	return nil
}

// Reinstall pushes sandbox id's saved rules to the dataplane again. The agent calls it when a
// sandbox it could not re-adopt at start (so New could not push its rules) has been re-adopted:
// without it the sandbox would come back healthy with an empty load balancer while its rules
// are still listed and saved.
func (m *Manager) Reinstall(ctx context.Context, id string) error {
	t, unlock := m.lock(id)
	defer unlock()
	if len(t.Services) == 0 {
		return nil
	}
	if err := m.lb.RestoreLB(ctx, id, t); err != nil {
		return fmt.Errorf("kata-ipvs: reinstall the rules of sandbox %s: %w", id, err)
	}
	return nil
}

// Ipvsadm runs one `kata-ipvs ipvsadm --parameters` command for sandbox id and returns what
// ipvsadm would print.
func (m *Manager) Ipvsadm(ctx context.Context, id, params string) (string, error) {
	cmd, err := ipvs.ParseKataParameters(params)
	if err != nil {
		return "", err
	}
	sb, err := m.resolve(ctx, id)
	if err != nil {
		return "", err
	}
	t, unlock := m.lock(sb.ID)
	defer unlock()
	if !cmd.Op.Mutates() {
		c, err := m.lb.LBCounters(ctx, sb.ID)
		if err != nil {
			return "", err
		}
		return t.Exec(cmd, c)
	}
	switch cmd.Op {
	case ipvs.OpAddService, ipvs.OpEditService, ipvs.OpDeleteService, ipvs.OpAddServer, ipvs.OpEditServer, ipvs.OpDeleteServer:
		if sl, ok := m.lb.(ServiceLB); ok {
			return m.applyToService(ctx, sb.ID, t, cmd, params, sl)
		}
	}
	next := t.Clone()
	out, err := next.Apply(cmd)
	if err != nil {
		return "", err
	}
	if err := m.commit(ctx, sb.ID, t, next, cmd.Op == ipvs.OpClear); err != nil {
		return "", err
	}
	return out, nil
}

// applyToService runs a command confined to one service on the live table (Apply validates
// before it changes anything), then hands that service to the dataplane and saves the table.
// A later failure puts the service back, in the table and in the dataplane. No copy of the
// whole table is made and the edit is journaled (saveEdit), so an edit costs the same at
// 20000 rules as at one.
func (m *Manager) applyToService(ctx context.Context, id string, t *ipvs.Table, cmd ipvs.Command, params string, sl ServiceLB) (string, error) {
	undo := t.SnapshotService(cmd.Service)
	out, err := t.Apply(cmd)
	if err != nil {
		return "", err
	}
	fail := func(err error) (string, error) {
		undo()
		if rerr := sl.SetLBService(ctx, id, t, cmd.Service); rerr != nil {
			m.log.Error("kata-ipvs: could not put the old service back", "sandbox", id, "service", cmd.Service, "err", rerr)
		}
		return "", err
	}
	if err := sl.SetLBService(ctx, id, t, cmd.Service); err != nil {
		return fail(err)
	}
	if err := m.saveEdit(id, t, params); err != nil {
		return fail(err)
	}
	m.mu.Lock()
	m.tables[id] = t
	m.mu.Unlock()
	return out, nil
}

// Restore runs `kata-ipvs ipvsadm --restore -`: every line is validated before anything is
// applied, and the dataplane switches to the whole set at once.
func (m *Manager) Restore(ctx context.Context, id string, r io.Reader) error {
	defer roomyGC()()
	cmds, err := ipvs.ParseRestoreChunks(r)
	if err != nil {
		return err
	}
	sb, err := m.resolve(ctx, id)
	if err != nil {
		return err
	}
	t, unlock := m.lock(sb.ID)
	defer unlock()
	if t.Rules() > 0 {
		return ErrRestoreNotEmpty
	}
	next := &ipvs.Table{ConnTimeouts: t.ConnTimeouts}
	if err := next.Restore(cmds...); err != nil {
		return err
	}
	return m.commit(ctx, sb.ID, t, next, true)
}

// restoreGCPercent is the garbage collector's GOGC while a restore runs. A restore of 20000
// rules allocates about 20 MB that live until it ends (the input, the commands, the table,
// its encoding, the map batches) over a live heap of a few MB: with the default of 100 the
// agent ran four collections per restore, 10-15% of the restore's CPU (agent-cpu-ms of
// BenchmarkRestoreCLI: 80-98 ms against 67-84 ms at 400) and stop-the-world pauses of up to
// 5 ms on this paravirtualized host. At 400 the heap may grow to five times the live heap
// during the restore; the default comes back when it ends.
const restoreGCPercent = 400

// gcRoom counts the restores running (of any sandbox) and keeps the GOGC they replaced.
var gcRoom struct {
	sync.Mutex
	n       int
	old     int
	changed bool
}

// roomyGC raises GOGC to restoreGCPercent until the function it returns is called, unless
// the agent's own setting is higher already or turns the collector off (GOGC=off). Restores
// of several sandboxes at once share the raise: the last to end puts the old value back.
func roomyGC() (done func()) {
	gcRoom.Lock()
	if gcRoom.n == 0 {
		gcRoom.old = debug.SetGCPercent(restoreGCPercent)
		gcRoom.changed = gcRoom.old >= 0 && gcRoom.old < restoreGCPercent
		if !gcRoom.changed {
			debug.SetGCPercent(gcRoom.old)
		}
	}
	gcRoom.n++
	gcRoom.Unlock()
	return func() {
		gcRoom.Lock()
		if gcRoom.n--; gcRoom.n == 0 && gcRoom.changed {
			debug.SetGCPercent(gcRoom.old)
		}
		gcRoom.Unlock()
	}
}

// Cleanup runs `kata-ipvs cleanup --parameters "--orig-dst IP --protonum tcp|udp"` and
// returns a one-line summary.
func (m *Manager) Cleanup(ctx context.Context, id, params string) (string, error) {
	c, err := ipvs.ParseCleanup(params)
	if err != nil {
		return "", err
	}
	sb, err := m.resolve(ctx, id)
	if err != nil {
		return "", err
	}
	_, unlock := m.lock(sb.ID)
	defer unlock()
	n, err := m.lb.CleanupConns(ctx, sb.ID, c.OrigDst, uint8(c.Proto))
	if err != nil {
		return "", err
	}
	m.log.Info("kata-ipvs cleanup", "sandbox", sb.ID, "orig-dst", c.OrigDst, "proto", c.Proto, "deleted", n)
	return "", nil
}

// Forget drops a removed sandbox's rules (its dataplane is gone with it).
func (m *Manager) Forget(id string) error {
	m.mu.Lock()
	delete(m.tables, id)
	delete(m.locks, id)
	delete(m.disk, id)
	m.mu.Unlock()
	if err := m.store.Delete(id); err != nil {
		return fmt.Errorf("kata-ipvs: forget %s: %w", id, err)
	}
	return nil
}

// Table returns a copy of the sandbox's rules.
func (m *Manager) Table(id string) *ipvs.Table {
	t, unlock := m.lock(id)
	defer unlock()
	return t.Clone()
}

// Sandboxes returns the ids of the sandboxes that have rules.
func (m *Manager) Sandboxes() []string {
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]string, 0, len(m.tables))
	for id, t := range m.tables {
		if t.Rules() > 0 {
			out = append(out, id)
		}
	}
	slices.Sort(out)
	return out
}

// Counters returns a copy of the sandbox's rules with the live counters of its load balancer,
// read together under the sandbox's lock so they agree (for the metrics). A sandbox without
// rules has no counters (nil).
func (m *Manager) Counters(ctx context.Context, id string) (*ipvs.Table, ipvs.Counters, error) {
	t, unlock := m.lock(id)
	defer unlock()
	if t.Rules() == 0 {
		return t.Clone(), nil, nil
	}
	c, err := m.lb.LBCounters(ctx, id)
	if err != nil {
		return nil, nil, err
	}
	return t.Clone(), c, nil
}

// replay applies the records of sandbox id's journal that came after its snapshot (seq) to t.
// A record that cannot be read or applied (it was applied once, to this very table, so only a
// damaged file gets here) ends the replay where it is, logged. Whatever was replayed is then
// written whole, so the next start does not meet the same records again.
func (m *Manager) replay(id string, t *ipvs.Table, seq uint64) {
	j, ok := m.store.(Journal)
	if !ok {
		return
	}
	recs, err := j.Journal(id)
	if err != nil {
		m.log.Error("kata-ipvs: journal unreadable; the sandbox starts with its last full save", "sandbox", id, "err", err)
		return
	}
	if len(recs) == 0 {
		return
	}
	applied := 0
	last := seq
	for _, b := range recs {
		var r record
		if err := json.Unmarshal(b, &r); err != nil {
			m.log.Error("kata-ipvs: journal record unreadable; later edits are lost", "sandbox", id, "err", err)
			break
		}
		if r.Seq <= last {
			continue // included in the snapshot
		}
		cmd, err := ipvs.ParseKataParameters(r.Params)
		if err == nil {
			_, err = t.Apply(cmd)
		}
		if err != nil {
			m.log.Error("kata-ipvs: journal record does not apply; later edits are lost", "sandbox", id, "params", r.Params, "err", err)
			break
		}
		last = r.Seq
		applied++
	}
	d := m.disk[id]
	d.seq = max(d.seq, last)
	for _, b := range recs { // the snapshot must skip every record present, applied or not
		var r record
		if json.Unmarshal(b, &r) == nil {
			d.seq = max(d.seq, r.Seq)
		}
	}
	m.disk[id] = d
	if err := m.saveWhole(id, t); err != nil {
		m.log.Error("kata-ipvs: could not write the replayed rules whole; the journal stays", "sandbox", id, "err", err)
	}
	m.log.Info("kata-ipvs: journal replayed", "sandbox", id, "records", applied)
}

// saveEdit makes an edit of sandbox id's table t (the command params, already applied)
// durable: one journal record, or the whole table when the store keeps no journal, the
// sandbox has no snapshot yet (a journal needs one to replay onto) or the journal is full.
// Called under the sandbox's lock.
func (m *Manager) saveEdit(id string, t *ipvs.Table, params string) error {
	j, ok := m.store.(Journal)
	m.mu.Lock()
	d := m.disk[id]
	m.mu.Unlock()
	if !ok || !d.snapshot || d.records >= JournalMax {
		return m.saveWhole(id, t)
	}
	b, err := json.Marshal(record{Seq: d.seq + 1, Params: params})
	if err == nil {
		err = j.Append(id, b)
	}
	if err != nil {
		return fmt.Errorf("save rules: %w", err)
	}
	d.seq++
	d.records++
	m.mu.Lock()
	m.disk[id] = d
	m.mu.Unlock()
	return nil
}

// saveWhole writes sandbox id's table t whole, then drops its journal (every record in it is
// at or below the snapshot's sequence number, so a journal left by a failed drop replays
// nothing). Called under the sandbox's lock (or from New).
func (m *Manager) saveWhole(id string, t *ipvs.Table) error {
	return m.saveEncoded(id, m.encode(id, t))
}

// encoded is a table encoded for saveEncoded.
type encoded struct {
	b      []byte
	staged *store.Staged // the encoding staged in the store (encodeAsync), or nil
	err    error
}

// Stager is implemented by stores that write a value ahead of making it the value
// (control/store does): see commit.
type Stager interface {
	Stage(key string, data []byte) (*store.Staged, error)
}

// encode encodes sandbox id's table t as saveWhole writes it. The snapshot's sequence number
// is read now: the caller holds the sandbox's lock, so no record is journaled in between.
func (m *Manager) encode(id string, t *ipvs.Table) encoded {
	m.mu.Lock()
	d := m.disk[id]
	m.mu.Unlock()
	b, err := encodeSnapshot(t, d.seq)
	return encoded{b: b, err: err}
}

// encodeAsync runs encode in a goroutine and stages the encoding when the store stages; t
// must not change until the result is received, and a staged result must be saved
// (saveEncoded) or aborted.
func (m *Manager) encodeAsync(id string, t *ipvs.Table) <-chan encoded {
	c := make(chan encoded, 1)
	go func() {
		e := m.encode(id, t)
		if sg, ok := m.store.(Stager); ok && e.err == nil {
			e.staged, e.err = sg.Stage(id, e.b)
		}
		c <- e
	}()
	return c
}

// saveEncoded is saveWhole's write: the table encoded by encode, then the journal dropped.
func (m *Manager) saveEncoded(id string, e encoded) error {
	err := e.err
	switch {
	case err != nil:
	case e.staged != nil:
		err = e.staged.Commit()
	default:
		err = m.store.Put(id, e.b)
	}
	if err != nil {
		return fmt.Errorf("save rules: %w", err)
	}
	m.mu.Lock()
	d := m.disk[id]
	m.mu.Unlock()
	if j, ok := m.store.(Journal); ok {
		if err := j.DropJournal(id); err != nil {
			m.log.Warn("kata-ipvs: journal not dropped after a full save (harmless: its records are in the save)", "sandbox", id, "err", err)
		}
	}
	d.snapshot, d.records = true, 0
	m.mu.Lock()
	m.disk[id] = d
	m.mu.Unlock()
	return nil
}
