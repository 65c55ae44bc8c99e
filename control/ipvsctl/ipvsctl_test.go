package ipvsctl_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/control/store"
)

// fakeLB records what the dataplane was given; fail makes the next push fail.
type fakeLB struct {
	pushed map[string]string // sandbox -> Save() of the last table
	fail   error
}

func (f *fakeLB) push(id string, t *ipvs.Table) error {
	if f.fail != nil {
		err := f.fail
		f.fail = nil
		return err
	}
	f.pushed[id] = t.Save()
	return nil
}
func (f *fakeLB) SetLB(_ context.Context, id string, t *ipvs.Table) error     { return f.push(id, t) }
func (f *fakeLB) RestoreLB(_ context.Context, id string, t *ipvs.Table) error { return f.push(id, t) }
func (f *fakeLB) LBCounters(context.Context, string) (ipvs.Counters, error)   { return nil, nil }
func (f *fakeLB) CleanupConns(context.Context, string, netip.Addr, uint8) (int, error) {
	return 0, nil
}

func resolver(ids ...string) ipvsctl.Resolver {
	return func(_ context.Context, id string) (control.Sandbox, error) {
		var found []string
		for _, x := range ids {
			if strings.HasPrefix(x, id) {
				found = append(found, x)
			}
		}
		if len(found) != 1 {
			return control.Sandbox{}, errors.New("no such container ID (" + id + ")")
		}
		return control.Sandbox{ID: found[0]}, nil
	}
}

// openStore opens a store in dir.
func openStore(t *testing.T, dir string) *store.Store {
	t.Helper()
	st, err := store.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// newFakeLB returns a fakeLB to which nothing was pushed.
func newFakeLB() *fakeLB { return &fakeLB{pushed: map[string]string{}} }

// newServiceLB returns a serviceLB to which nothing was pushed.
func newServiceLB() *serviceLB { return &serviceLB{*newFakeLB()} }

// newManager starts a manager, as the agent's start does, over lb and st for the registered
// sandboxes ids (which the resolver finds by id or unique prefix).
func newManager(t *testing.T, lb ipvsctl.LB, st ipvsctl.Store, ids ...string) *ipvsctl.Manager {
	t.Helper()
	sbs := make([]control.Sandbox, len(ids))
	for i, id := range ids {
		sbs[i] = control.Sandbox{ID: id}
	}
	m, err := ipvsctl.New(context.Background(), lb, st, resolver(ids...), sbs, nil)
	if err != nil {
		t.Fatalf("ipvsctl.New: %v", err)
	}
	return m
}

func TestCommandsPersistAndFailuresChangeNothing(t *testing.T) {
	ctx := context.Background()
	st := openStore(t, t.TempDir())
	lb := newFakeLB()
	m := newManager(t, lb, st, "6ec7a98abc")
	for _, p := range []string{
		"--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 3000",
		"--add-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 100",
	} {
		if _, err := m.Ipvsadm(ctx, "6ec7", p); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
	}
	want := "-A -t 172.17.0.7:80 -s rr -p 3000\n-a -t 172.17.0.7:80 -r 172.17.0.4:80 -m -w 100\n"
	if got := lb.pushed["6ec7a98abc"]; got != want {
		t.Errorf("dataplane got %q, want %q", got, want)
	}
	// A bad command and a dataplane failure both leave everything as it was.
	if _, err := m.Ipvsadm(ctx, "6ec7", "--add-service --tcp-service 172.17.0.7:80 -s wlc -p 60"); err == nil || !strings.Contains(err.Error(), "Service already exists") {
		t.Errorf("duplicate service: %v", err)
	}
	lb.fail = errors.New("boom")
	if _, err := m.Ipvsadm(ctx, "6ec7", "--delete-service --tcp-service 172.17.0.7:80"); err == nil {
		t.Error("dataplane failure not reported")
	}
	if got := m.Table("6ec7a98abc").Save(); got != want {
		t.Errorf("table after failures %q, want %q", got, want)
	}
	// Restore is refused while rules exist, accepted after --clear.
	rules := "-A -t 10.10.11.12:100 -s rr -p  3000\n-a -t 10.10.11.12:100 -r  172.16.0.1:80 -m\n"
	if err := m.Restore(ctx, "6ec7", strings.NewReader(rules)); !errors.Is(err, ipvsctl.ErrRestoreNotEmpty) {
		t.Errorf("restore into a full table: %v", err)
	}
	if _, err := m.Ipvsadm(ctx, "6ec7", "--clear"); err != nil {
		t.Fatal(err)
	}
	if err := m.Restore(ctx, "6ec7", strings.NewReader(rules)); err != nil {
		t.Fatal(err)
	}
	// A new manager (agent restart) finds the rules and pushes them again.
	lb2 := newFakeLB()
	m2 := newManager(t, lb2, st, "6ec7a98abc")
	want2 := "-A -t 10.10.11.12:100 -s rr -p 3000\n-a -t 10.10.11.12:100 -r 172.16.0.1:80 -m -w 1\n"
	if got := m2.Table("6ec7a98abc").Save(); got != want2 || lb2.pushed["6ec7a98abc"] != want2 {
		t.Errorf("after restart: table %q, dataplane %q, want %q", got, lb2.pushed["6ec7a98abc"], want2)
	}
	if _, err := m.Ipvsadm(ctx, "ffff", "--list"); err == nil {
		t.Error("unknown sandbox accepted")
	}
}

// serviceLB is a fakeLB that also takes per-service edits.
type serviceLB struct{ fakeLB }

func (f *serviceLB) SetLBService(_ context.Context, id string, t *ipvs.Table, _ ipvs.ServiceKey) error {
	return f.push(id, t)
}

// TestServiceEditsInPlace: commands confined to one service go through SetLBService on the
// live table; a dataplane failure puts the table back as it was.
func TestServiceEditsInPlace(t *testing.T) {
	ctx := context.Background()
	lb := newServiceLB()
	m := newManager(t, lb, openStore(t, t.TempDir()), "sb1")
	for _, p := range []string{"-A -t 10.0.0.1:80 -s rr -p 60", "-a -t 10.0.0.1:80 -r 10.1.0.1:80", "-A -u 10.0.0.2:53 -s sh -p 60"} {
		if _, err := m.Ipvsadm(ctx, "sb1", p); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
	}
	want := m.Table("sb1").Save()
	if lb.pushed["sb1"] != want {
		t.Errorf("dataplane got %q, want %q", lb.pushed["sb1"], want)
	}
	lb.fail = errors.New("boom")
	if _, err := m.Ipvsadm(ctx, "sb1", "-d -t 10.0.0.1:80 -r 10.1.0.1:80"); err == nil {
		t.Fatal("dataplane failure not reported")
	}
	if got := m.Table("sb1").Save(); got != want {
		t.Errorf("table after a failed edit %q, want %q", got, want)
	}
	if lb.pushed["sb1"] != want {
		t.Errorf("dataplane after a failed edit %q, want %q", lb.pushed["sb1"], want)
	}
}

// lbNoSandbox is a dataplane that lost one sandbox (it could not be re-adopted).
type lbNoSandbox struct {
	*fakeLB
	lost string
}

func (f lbNoSandbox) RestoreLB(ctx context.Context, id string, t *ipvs.Table) error {
	if id == f.lost {
		return errors.New("restore lb: no such sandbox: " + id)
	}
	return f.fakeLB.RestoreLB(ctx, id, t)
}

// TestNewSurvivesBadTables: rules the dataplane cannot take back (the sandbox was not
// re-adopted) or cannot be decoded do not stop the manager (and so the agent) from starting;
// the first are kept until the sandbox is forgotten, the second moved aside.
func TestNewSurvivesBadTables(t *testing.T) {
	dir := t.TempDir()
	st := openStore(t, dir)
	rules := `{"services":[]}`
	for id, b := range map[string]string{"good": rules, "lost": rules, "junk": "{not json"} {
		if err := st.Put(id, []byte(b)); err != nil {
			t.Fatal(err)
		}
	}
	lb := lbNoSandbox{newFakeLB(), "lost"}
	m := newManager(t, lb, st, "good", "lost", "junk")
	if _, ok := lb.pushed["good"]; !ok || len(lb.pushed) != 1 {
		t.Errorf("pushed %v, want good only", lb.pushed)
	}
	keys, err := st.Keys()
	if err != nil || strings.Join(keys, ",") != "good,lost" {
		t.Errorf("saved tables %v, %v; want good,lost (junk moved aside)", keys, err)
	}
	if err := m.Forget("lost"); err != nil {
		t.Fatal(err)
	}
	if keys, _ := st.Keys(); strings.Join(keys, ",") != "good" {
		t.Errorf("after Forget: %v", keys)
	}
}

// lbDown is a dataplane in which the sandboxes in down cannot be reached (not re-adopted yet).
type lbDown struct {
	*fakeLB
	down map[string]bool
}

func (f lbDown) RestoreLB(ctx context.Context, id string, t *ipvs.Table) error {
	if f.down[id] {
		return errors.New("restore lb: no such sandbox: " + id)
	}
	return f.fakeLB.RestoreLB(ctx, id, t)
}

// TestReinstallAfterReadoption: the rules of a sandbox the dataplane could not take at start
// reach it once the sandbox is re-adopted (the agent calls Reinstall then); a sandbox without
// rules is left alone.
func TestReinstallAfterReadoption(t *testing.T) {
	ctx := context.Background()
	st := openStore(t, t.TempDir())
	first := newManager(t, newFakeLB(), st, "late", "empty")
	if _, err := first.Ipvsadm(ctx, "late", "-A -t 10.0.0.1:80 -s rr -p 300"); err != nil {
		t.Fatal(err)
	}
	want := first.Table("late").Save()

	lb := lbDown{newFakeLB(), map[string]bool{"late": true}}
	m := newManager(t, lb, st, "late", "empty")
	if _, ok := lb.pushed["late"]; ok {
		t.Fatal("pushed to a sandbox that is down")
	}
	if err := m.Reinstall(ctx, "late"); err == nil || !strings.Contains(err.Error(), "late") {
		t.Errorf("Reinstall while still down: %v, want an error naming the sandbox", err)
	}
	delete(lb.down, "late")
	if err := m.Reinstall(ctx, "late"); err != nil {
		t.Fatalf("Reinstall: %v", err)
	}
	if lb.pushed["late"] != want {
		t.Errorf("dataplane after Reinstall %q, want %q", lb.pushed["late"], want)
	}
	if err := m.Reinstall(ctx, "empty"); err != nil {
		t.Errorf("Reinstall of a sandbox without rules: %v", err)
	}
	if _, ok := lb.pushed["empty"]; ok {
		t.Error("Reinstall pushed an empty table")
	}
}

// countingStore counts the whole-table saves of a control/store.Store.
type countingStore struct {
	*store.Store
	puts int
}

func (s *countingStore) Put(key string, b []byte) error { s.puts++; return s.Store.Put(key, b) }

// TestJournal: an edit confined to one service is journaled (one record, no whole save) once
// the sandbox has a save to replay onto; a restart replays the journal to the same table and
// writes it whole; records a whole save already includes (a crash between the save and the
// journal's removal) and a record torn by a crash are not applied; after JournalMax records
// the table is written whole again.
func TestJournal(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := openStore(t, dir)
	st := &countingStore{Store: s}
	m := newManager(t, newServiceLB(), st, "sb1")
	run := func(m *ipvsctl.Manager, p string) {
		t.Helper()
		if _, err := m.Ipvsadm(ctx, "sb1", p); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
	}
	run(m, "-A -t 10.0.0.1:80 -s rr -p 60") // first save: whole (nothing to replay onto yet)
	run(m, "-a -t 10.0.0.1:80 -r 10.1.0.1:80")
	run(m, "-a -t 10.0.0.1:80 -r 10.1.0.2:80 -w 3")
	run(m, "-A -u 10.0.0.2:53 -s sh -p 60")
	run(m, "-e -t 10.0.0.1:80 -r 10.1.0.2:80 -w 5")
	if st.puts != 1 {
		t.Errorf("%d whole saves for 5 edits, want 1 (the first)", st.puts)
	}
	recs, _ := s.Journal("sb1")
	if len(recs) != 4 {
		t.Fatalf("journal has %d records, want 4: %q", len(recs), recs)
	}
	want := m.Table("sb1").Save()

	restart := func() *ipvsctl.Manager {
		t.Helper()
		lb := newServiceLB()
		m := newManager(t, lb, st, "sb1")
		if got := m.Table("sb1").Save(); got != want {
			t.Errorf("table after restart:\n%s\nwant:\n%s", got, want)
		}
		if lb.pushed["sb1"] != want {
			t.Errorf("dataplane after restart got %q, want %q", lb.pushed["sb1"], want)
		}
		return m
	}
	m = restart()
	if recs, _ := s.Journal("sb1"); len(recs) != 0 {
		t.Errorf("journal not folded into the save at start: %q", recs)
	}

	// A crash after the whole save, before the journal was dropped: its records are in the save.
	run(m, "-d -t 10.0.0.1:80 -r 10.1.0.1:80")
	recs, _ = s.Journal("sb1")
	want = m.Table("sb1").Save()
	m = restart() // folds it in
	for _, r := range recs {
		s.Append("sb1", r)
	}
	f, err := os.OpenFile(filepath.Join(dir, "sb1.journal"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(`{"seq":99,"params":"-D -t 10.0`) // torn by a crash: never acknowledged
	f.Close()
	m = restart()

	// JournalMax records, then a whole save.
	puts := st.puts
	for i := range ipvsctl.JournalMax + 1 {
		run(m, fmt.Sprintf("-e -t 10.0.0.1:80 -r 10.1.0.2:80 -w %d", i%7+1))
	}
	if st.puts != puts+1 {
		t.Errorf("%d whole saves for JournalMax+1 edits, want 1", st.puts-puts)
	}
	want = m.Table("sb1").Save()
	restart()
}

// TestJournalDamaged: a journal record that does not apply (only a damaged file has one) ends
// the replay there; the agent starts, and what was replayed is written whole so the next start
// does not meet the record again.
func TestJournalDamaged(t *testing.T) {
	ctx := context.Background()
	s := openStore(t, t.TempDir())
	m := newManager(t, newServiceLB(), s, "sb1")
	if _, err := m.Ipvsadm(ctx, "sb1", "-A -t 10.0.0.1:80 -s rr -p 60"); err != nil {
		t.Fatal(err)
	}
	want := m.Table("sb1").Save()
	s.Append("sb1", []byte(`{"seq":1,"params":"-a -t 10.9.9.9:80 -r 10.1.0.1:80"}`)) // no such service
	s.Append("sb1", []byte(`{"seq":2,"params":"-A -t 10.0.0.3:80 -s rr -p 60"}`))
	for range 2 {
		m := newManager(t, newServiceLB(), s, "sb1") // a damaged journal does not stop it
		if got := m.Table("sb1").Save(); got != want {
			t.Errorf("table %q, want the last good one %q", got, want)
		}
		if recs, _ := s.Journal("sb1"); len(recs) != 0 {
			t.Errorf("damaged journal kept: %q", recs)
		}
	}
}

// gcLB records the collector's GOGC while the dataplane takes a restore; wait, when set,
// holds the push of sandbox "a"'s rules (not of its --clear) until it is closed.
type gcLB struct {
	fakeLB
	mu     sync.Mutex
	seen   []int
	inPush chan struct{}
	wait   chan struct{}
}

func gcPercent() int {
	v := debug.SetGCPercent(100)
	debug.SetGCPercent(v)
	return v
}

func (f *gcLB) RestoreLB(_ context.Context, id string, t *ipvs.Table) error {
	f.mu.Lock()
	f.seen = append(f.seen, gcPercent())
	f.mu.Unlock()
	if id == "a" && f.wait != nil && len(t.Services) > 0 {
		close(f.inPush)
		<-f.wait
	}
	return nil
}

// TestRestoreGC: a restore runs with GOGC 400 unless the agent's is higher or off, and the
// agent's comes back when the last of overlapping restores ends.
func TestRestoreGC(t *testing.T) {
	ctx := context.Background()
	orig := debug.SetGCPercent(100)
	t.Cleanup(func() { debug.SetGCPercent(orig) })
	lb := &gcLB{fakeLB: *newFakeLB()}
	m := newManager(t, lb, openStore(t, t.TempDir()), "a", "b")
	restore := func(id string) error {
		if _, err := m.Ipvsadm(ctx, id, "--clear"); err != nil {
			return err
		}
		return m.Restore(ctx, id, strings.NewReader("-A -t 10.0.0.1:80 -s rr\n"))
	}
	for _, c := range []struct{ gogc, during int }{{100, 400}, {50, 400}, {800, 800}, {-1, -1}} {
		debug.SetGCPercent(c.gogc)
		lb.seen = nil
		if err := restore("b"); err != nil {
			t.Fatal(err)
		}
		// --clear is a restore of the dataplane too, outside Restore: the agent's GOGC.
		if want := []int{c.gogc, c.during}; !slices.Equal(lb.seen, want) {
			t.Errorf("GOGC %d: pushes saw %v, want %v", c.gogc, lb.seen, want)
		}
		if got := gcPercent(); got != c.gogc {
			t.Errorf("GOGC %d: after the restore %d", c.gogc, got)
		}
	}
	// Overlapping restores: "a" holds its push while "b" runs whole.
	debug.SetGCPercent(100)
	lb.inPush, lb.wait = make(chan struct{}), make(chan struct{})
	errc := make(chan error)
	go func() { errc <- restore("a") }()
	<-lb.inPush
	if err := restore("b"); err != nil {
		t.Fatal(err)
	}
	if got := gcPercent(); got != 400 {
		t.Errorf("while a restore still runs, GOGC %d, want 400", got)
	}
	close(lb.wait)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if got := gcPercent(); got != 100 {
		t.Errorf("after both restores, GOGC %d, want 100", got)
	}
}

// TestRefusedPushSavesNothing: the table is encoded and staged in the store beside the push;
// when the dataplane refuses the rules, what a restarted agent reads is the table before.
func TestRefusedPushSavesNothing(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	lb := newFakeLB()
	m := newManager(t, lb, openStore(t, dir), "sb")
	before := "-A -t 10.0.0.1:80 -s rr\n"
	if err := m.Restore(ctx, "sb", strings.NewReader(before)); err != nil {
		t.Fatal(err)
	}
	for _, cmd := range []string{"--clear", "--add-service -t 10.0.0.2:80 -s wlc -p 60"} {
		lb.fail = errors.New("refused")
		if _, err := m.Ipvsadm(ctx, "sb", cmd); err == nil {
			t.Fatalf("%s: the refusal was not reported", cmd)
		}
		m2 := newManager(t, newFakeLB(), openStore(t, dir), "sb")
		if got := m2.Table("sb").Save(); got != before {
			t.Errorf("after a refused %s, a restarted agent reads %q, want %q", cmd, got, before)
		}
	}
	// And the store still takes the next save.
	if _, err := m.Ipvsadm(ctx, "sb", "--add-service -t 10.0.0.3:80 -s rr -p 60"); err != nil {
		t.Fatal(err)
	}
}
