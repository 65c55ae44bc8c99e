package store

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

func TestPutGetDelete(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get("a"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Get(missing) = %v, want ErrNotFound", err)
	}
	for _, kv := range []struct{ k, v string }{{"a", "1"}, {"b", "2"}, {"a", "3"}} {
		if err := s.Put(kv.k, []byte(kv.v)); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	want := map[string][]byte{"a": []byte("3"), "b": []byte("2")}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("Load (-want +got):\n%s", d)
	}
	if err := s.Delete("a"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete("a"); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	keys, err := s.Keys()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"b"}, keys); d != "" {
		t.Errorf("Keys (-want +got):\n%s", d)
	}
	ents, _ := os.ReadDir(s.Dir())
	if len(ents) != 1 {
		t.Errorf("directory holds %d entries, want 1 (no temporary files left)", len(ents))
	}
}

func TestBadKeys(t *testing.T) {
	s, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"", "../x", "a/b", ".hidden", ".tmp-x", "-x", strings.Repeat("a", 202)} {
		if err := s.Put(k, nil); !errors.Is(err, ErrBadKey) {
			t.Errorf("Put(%q) = %v, want ErrBadKey", k, err)
		}
	}
	if err := s.Put(strings.Repeat("a", 201), nil); err != nil {
		t.Errorf("Put of a 201-character key: %v", err)
	}
	// validKey is the pattern it replaced, written out: every key of up to three of these
	// characters agrees with it.
	re := regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$`)
	alphabet := []string{"", "a", "Z", "0", "_", ".", "-", "/", " ", "\x00", "é", "\n"}
	for _, a := range alphabet {
		for _, b := range alphabet {
			for _, c := range alphabet {
				if k := a + b + c; validKey(k) != re.MatchString(k) {
					t.Errorf("validKey(%q) = %v, the pattern says %v", k, validKey(k), re.MatchString(k))
				}
			}
		}
	}
}

func TestOpenRemovesLeftovers(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, ".tmp-a-123"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "a.json"), []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Load()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(map[string][]byte{"a": []byte("old")}, got); d != "" {
		t.Errorf("Load (-want +got):\n%s", d)
	}
	if _, err := os.Stat(filepath.Join(dir, ".tmp-a-123")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("leftover temporary file not removed: %v", err)
	}
}

// value returns the n-th version of the payload the writer child writes: large enough that a
// torn write would be visible, and self-describing so the reader can check it whole.
func value(n int) []byte {
	line := []byte("version " + strconv.Itoa(n) + "\n")
	return bytes.Repeat(line, 20000)
}

func checkValue(b []byte) bool {
	if len(b) == 0 {
		return false
	}
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return false
	}
	n, err := strconv.Atoi(string(bytes.TrimPrefix(b[:i], []byte("version "))))
	return err == nil && bytes.Equal(b, value(n))
}

// TestHelperWriter is the child of TestKill9: it rewrites one key forever.
func TestHelperWriter(t *testing.T) {
	dir := os.Getenv("KDP_STORE_WRITER_DIR")
	if dir == "" {
		t.Skip("helper process only")
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	for n := 1; ; n++ {
		if err := s.Put("state", value(n)); err != nil {
			t.Fatal(err)
		}
	}
}

func TestKill9LeavesOldOrNew(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put("state", value(0)); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		cmd := exec.Command(os.Args[0], "-test.run=^TestHelperWriter$")
		cmd.Env = append(os.Environ(), "KDP_STORE_WRITER_DIR="+dir)
		if err := proctest.Start(cmd); err != nil {
			t.Fatal(err)
		}
		time.Sleep(time.Duration(20+i*13) * time.Millisecond)
		cmd.Process.Signal(syscall.SIGKILL)
		cmd.Wait()
		s, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		b, err := s.Get("state")
		if err != nil {
			t.Fatal(err)
		}
		if !checkValue(b) {
			t.Fatalf("round %d: state is torn (%d bytes)", i, len(b))
		}
	}
}

func TestMoveAside(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Put("bad", []byte("{")); err != nil {
		t.Fatal(err)
	}
	to, err := s.MoveAside("bad")
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(to) != dir || !strings.HasPrefix(filepath.Base(to), "bad.json.corrupt-") {
		t.Errorf("moved to %s", to)
	}
	if b, err := os.ReadFile(to); err != nil {
		t.Errorf("moved file: %v", err)
	} else if v, err := readValue(b); err != nil || string(v) != "{" {
		t.Errorf("moved file holds %q, %v", v, err)
	}
	if keys, err := s.Keys(); err != nil || len(keys) != 0 {
		t.Errorf("Keys after MoveAside = %v, %v", keys, err)
	}
	if _, err := s.MoveAside("bad"); err == nil {
		t.Error("MoveAside of a missing key succeeded")
	}
}

// TestJournal: records come back in order; a record torn by a crash (no newline) is left out;
// DropJournal and Delete remove the journal; Keys never lists it.
func TestJournal(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if recs, err := s.Journal("sb"); err != nil || recs != nil {
		t.Fatalf("journal of a key without one: %q, %v", recs, err)
	}
	for _, r := range []string{"one", "two", "three"} {
		if err := s.Append("sb", []byte(r)); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Append("sb", []byte("a\nb")); err == nil {
		t.Error("a record with a newline was accepted")
	}
	if err := s.Append("../x", []byte("r")); !errors.Is(err, ErrBadKey) {
		t.Errorf("bad key: %v", err)
	}
	// A crash in the middle of an append leaves a record without its newline.
	f, err := os.OpenFile(filepath.Join(dir, "sb.journal"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString("fou")
	f.Close()
	recs, err := s.Journal("sb")
	if err != nil {
		t.Fatal(err)
	}
	if got := string(bytes.Join(recs, []byte(","))); got != "one,two,three" {
		t.Errorf("journal %q, want one,two,three", got)
	}
	if err := s.Put("sb", []byte("{}")); err != nil {
		t.Fatal(err)
	}
	if keys, _ := s.Keys(); len(keys) != 1 || keys[0] != "sb" {
		t.Errorf("keys %v, want [sb]", keys)
	}
	if err := s.DropJournal("sb"); err != nil {
		t.Fatal(err)
	}
	if recs, _ := s.Journal("sb"); recs != nil {
		t.Errorf("journal after DropJournal: %q", recs)
	}
	if err := s.DropJournal("sb"); err != nil {
		t.Errorf("DropJournal without a journal: %v", err)
	}
	s.Append("sb", []byte("again"))
	if err := s.Delete("sb"); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("left after Delete: %v", ents)
	}
}
