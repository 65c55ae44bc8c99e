package store

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestStage: a staged value is not the key's value (for this store, and for a fresh one, as
// after a crash) until Commit; Abort leaves the value before. Both ways: in place (a file of
// slots with room) and written whole (a new key, a value outgrowing its slot).
func TestStage(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	get := func(key string) string {
		t.Helper()
		// A fresh store knows nothing of what s wrote: it reads what a restarted agent reads.
		fresh := &Store{dir: dir}
		b, err := fresh.Get(key)
		if errors.Is(err, ErrNotFound) {
			return "<none>"
		}
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	stage := func(key, v string) *Staged {
		t.Helper()
		st, err := s.Stage(key, []byte(v))
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	commit := func(st *Staged) {
		t.Helper()
		if err := st.Commit(); err != nil {
			t.Fatal(err)
		}
	}
	leftovers := func() {
		t.Helper()
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			if strings.HasPrefix(e.Name(), tmpPrefix) {
				t.Errorf("temporary file %s left", e.Name())
			}
		}
	}

	// A new key: written whole under a temporary name, renamed at Commit.
	st := stage("k", "one")
	if got := get("k"); got != "<none>" {
		t.Errorf("staged new key read as %q", got)
	}
	st.Abort()
	leftovers()
	if got := get("k"); got != "<none>" {
		t.Errorf("aborted new key read as %q", got)
	}
	commit(stage("k", "one"))
	if got := get("k"); got != "one" {
		t.Errorf("committed new key = %q, want one", got)
	}
	fi, err := os.Stat(filepath.Join(dir, "k.json"))
	if err != nil {
		t.Fatal(err)
	}

	// In place: the file keeps its inode; the staged slot reads as torn until Commit.
	for i, v := range []string{"two", "three", "four"} {
		st := stage("k", v)
		prev := map[int]string{0: "one", 1: "two", 2: "two"}[i]
		if got := get("k"); got != prev {
			t.Errorf("while %q is staged, read %q, want %q", v, got, prev)
		}
		if i == 1 {
			st.Abort()
			continue
		}
		commit(st)
		if got := get("k"); got != v {
			t.Errorf("after committing %q, read %q", v, got)
		}
	}
	if fi2, err := os.Stat(filepath.Join(dir, "k.json")); err != nil || !os.SameFile(fi, fi2) {
		t.Errorf("in-place stages replaced the file (%v)", err)
	}
	// Put after stages continues the sequence; its value wins over the staged ones.
	if err := s.Put("k", []byte("five")); err != nil {
		t.Fatal(err)
	}
	if got := get("k"); got != "five" {
		t.Errorf("after Put, read %q, want five", got)
	}

	// A value that outgrows the slot: written whole again.
	big := strings.Repeat("x", 3*slotAlign)
	st = stage("k", big)
	if got := get("k"); got != "five" {
		t.Errorf("while a larger value is staged, read %q, want five", got)
	}
	commit(st)
	if got := get("k"); got != big {
		t.Errorf("after committing the larger value, read %d bytes", len(got))
	}
	if fi3, err := os.Stat(filepath.Join(dir, "k.json")); err != nil || os.SameFile(fi, fi3) {
		t.Errorf("the larger value was not written as a new file (%v)", err)
	}
	leftovers()

	// The key is unlocked after Commit and Abort: writes go on.
	if err := s.Put("k", []byte("six")); err != nil {
		t.Fatal(err)
	}
	if got := get("k"); got != "six" {
		t.Errorf("last Put read %q", got)
	}
	if _, err := s.Stage("../bad", []byte("x")); !errors.Is(err, ErrBadKey) {
		t.Errorf("Stage of a bad key: %v", err)
	}
}
