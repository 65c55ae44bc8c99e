package store

import (
	"encoding/binary"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// Staged is a value written ahead of the moment it may become the key's value: Stage does
// the bulk of a Put (the value written and flushed where it will be read from, but not yet
// valid), Commit makes it the value with a small write and flush, Abort drops it. The agent
// stages a kata-ipvs restore's table (about 1.2 MB for 20000 rules) while the dataplane takes
// the rules, and commits it only once the dataplane has them: the restore's answer then waits
// for a flush of one block instead of the whole table's (1.5-7 ms on this project's host).
//
// In place (a file of slots with room), the slot not holding the newest value gets the new
// record with its CRC inverted, so a reader (after a crash) skips it as torn and reads the
// value before; Commit writes the CRC. Otherwise (the key's first value, or one that outgrew
// its slot) the new file is written and fsynced under a temporary name, and Commit renames it
// over the old one and fsyncs the directory, as Put does.
//
// The key stays locked from Stage until Commit or Abort: other writes of it wait.
type Staged struct {
	s    *Store
	k    *keyLock
	key  string
	path string
	seq  uint64
	// In place: the file, the slot and its CRC.
	f      *os.File
	target int
	crc    [4]byte
	// Written whole: the temporary file and what it holds.
	tmp  string
	ino  uint64
	size int64
}

// Stage writes data for key without making it the value; see Staged. On error nothing is
// staged and the key is not locked.
func (s *Store) Stage(key string, data []byte) (*Staged, error) {
	path, err := s.path(key)
	if err != nil {
		return nil, fmt.Errorf("stage %s: %w", key, err)
	}
	k := s.lockKey(key)
	st := &Staged{s: s, k: k, key: key, path: path}
	if err := st.write(data); err != nil {
		k.mu.Unlock()
		return nil, fmt.Errorf("stage %s: %w", key, err)
	}
	return st, nil
}

func (st *Staged) write(data []byte) error {
	w, err := prepareWrite(st.path, st.k, data)
	if err != nil {
		return err
	}
	st.seq = w.seq
	if w.f != nil {
		// Written with its CRC inverted: torn to a reader until Commit writes the CRC.
		st.f, st.target = w.f, w.target
		copy(st.crc[:], w.rec[20:24])
		binary.LittleEndian.PutUint32(w.rec[20:], ^binary.LittleEndian.Uint32(st.crc[:]))
		if err := w.writeSlot(st.k); err != nil {
			w.f.Close()
			return err
		}
		return nil
	}
	st.tmp, st.ino, err = st.s.writeTemp(st.key, w.rec, 2*w.size)
	st.size = w.size
	return err
}

// Commit makes the staged value the key's value, durably, and unlocks the key. On error the
// key's value is the one before or the staged one (as after a crash); the store reads the
// file again before its next write.
func (st *Staged) Commit() error {
	defer st.k.mu.Unlock()
	k := st.k
	if st.f == nil {
		if err := st.s.renameTemp(st.tmp, st.path); err != nil {
			k.file = nil
			return fmt.Errorf("commit %s: %w", st.key, err)
		}
		k.file = &slotFile{ino: st.ino, size: st.size, seq: st.seq, newest: 0}
		return nil
	}
	defer st.f.Close()
	if _, err := st.f.WriteAt(st.crc[:], int64(st.target)*k.file.size+20); err != nil {
		k.file = nil
		return fmt.Errorf("commit %s: %w", st.key, err)
	}
	if err := unix.Fdatasync(int(st.f.Fd())); err != nil {
		k.file = nil
		return fmt.Errorf("commit %s: fdatasync: %w", st.key, err)
	}
	k.file.seq, k.file.newest = st.seq, st.target
	return nil
}

// Abort drops the staged value (the key keeps its value) and unlocks the key.
func (st *Staged) Abort() {
	defer st.k.mu.Unlock()
	if st.f != nil {
		st.f.Close()
		return
	}
	os.Remove(st.tmp)
}
