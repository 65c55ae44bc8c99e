package store

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

// TestSlots: after the first write a key's file keeps its inode and size while values of up to
// twice the first one's size are written in place; a larger value makes a new file; each read
// returns the last value written, also from a fresh Store (no cached knowledge).
func TestSlots(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "k.json")
	stat := func() os.FileInfo {
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		return fi
	}
	if err := s.Put("k", []byte("first")); err != nil {
		t.Fatal(err)
	}
	fi0 := stat()
	for i, v := range []string{"second", "third, a bit longer", "", "fifth"} {
		if i%2 == 1 {
			if s, err = Open(dir); err != nil { // a new Store knows nothing of the file
				t.Fatal(err)
			}
		}
		if err := s.Put("k", []byte(v)); err != nil {
			t.Fatal(err)
		}
		if fi := stat(); !os.SameFile(fi0, fi) || fi.Size() != fi0.Size() {
			t.Errorf("value %q: the file was replaced (size %d, was %d)", v, fi.Size(), fi0.Size())
		}
		if b, err := s.Get("k"); err != nil || string(b) != v {
			t.Errorf("Get after Put(%q) = %q, %v", v, b, err)
		}
	}
	big := bytes.Repeat([]byte("x"), 3*slotAlign)
	if err := s.Put("k", big); err != nil {
		t.Fatal(err)
	}
	if fi := stat(); os.SameFile(fi0, fi) || fi.Size() <= fi0.Size() {
		t.Errorf("a value too large for its slot did not make a new file (size %d)", fi.Size())
	}
	if b, err := s.Get("k"); err != nil || !bytes.Equal(b, big) {
		t.Errorf("Get of the large value: %d bytes, %v", len(b), err)
	}
}

// TestSlotTornOrDamaged: a slot whose bytes do not match its checksum (a write torn by a crash,
// or damage) is skipped and the value before it is read; the next write goes to that slot, so
// the good value is never overwritten; a file with no valid slot is ErrCorrupt.
func TestSlotTornOrDamaged(t *testing.T) {
	dir := t.TempDir()
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "k.json")
	for _, v := range []string{"one", "two"} {
		if err := s.Put("k", []byte(v)); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	size := len(b) / 2
	// "two" is in slot 1: damage its last byte, as a torn write would leave it.
	b[size+slotHeader+2] ^= 0xff
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if s, err = Open(dir); err != nil {
		t.Fatal(err)
	}
	if got, err := s.Get("k"); err != nil || string(got) != "one" {
		t.Fatalf("Get with the newest slot torn = %q, %v; want the value before", got, err)
	}
	if err := s.Put("k", []byte("three")); err != nil {
		t.Fatal(err)
	}
	b, _ = os.ReadFile(path)
	if v, _, err := parseSlots(b); err != nil || string(v) != "three" || !bytes.Contains(b[:size], []byte("one")) {
		t.Errorf("after the write: newest %q (%v); slot 0 must still hold one", v, err)
	}
	// Both slots damaged.
	b[slotHeader] ^= 0xff
	b[size+slotHeader] ^= 0xff
	os.WriteFile(path, b, 0o600)
	if _, err := s.Get("k"); !errors.Is(err, ErrCorrupt) {
		t.Errorf("Get with no valid slot = %v, want ErrCorrupt", err)
	}
}

// TestSlotsReadOldFiles: a value written whole by an earlier version (plain JSON) is read as
// it is, and the next write turns it into a file of slots.
func TestSlotsReadOldFiles(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "k.json")
	if err := os.WriteFile(path, []byte(`{"old":true}`), 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	if b, err := s.Get("k"); err != nil || string(b) != `{"old":true}` {
		t.Fatalf("Get of a plain file = %q, %v", b, err)
	}
	if err := s.Put("k", []byte(`{"new":true}`)); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(path)
	if !isSlots(b) {
		t.Error("the write did not make a file of slots")
	}
	if b, err := s.Get("k"); err != nil || string(b) != `{"new":true}` {
		t.Errorf("Get = %q, %v", b, err)
	}
}

// BenchmarkPut compares the two ways a value is written, side by side in one run: in place
// (a slot overwritten, one fdatasync: every write after a key's first) and whole (a
// temporary file, fsync, rename, directory fsync: the first write, and every write before
// the file of slots). The value is the size of a sandbox's saved state with one NIC.
//
//	go test -run XXX -bench Put -benchtime 200x -count 3 ./control/store/
func BenchmarkPut(b *testing.B) {
	val := bytes.Repeat([]byte("x"), 1500)
	b.Run("in-place", func(b *testing.B) {
		s, err := Open(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		s.Put("k", val)
		b.ResetTimer()
		for range b.N {
			if err := s.Put("k", val); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("whole", func(b *testing.B) {
		s, err := Open(b.TempDir())
		if err != nil {
			b.Fatal(err)
		}
		path := filepath.Join(s.Dir(), "k.json")
		rec, size := newSlotFile(1, val)
		b.ResetTimer()
		for range b.N {
			if _, err := s.writeWhole("k", path, rec, 2*size); err != nil {
				b.Fatal(err)
			}
		}
	})
}
