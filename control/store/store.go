package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultDir is where the agent keeps its state unless told otherwise.
const DefaultDir = "/var/lib/kata-dp"

const (
	suffix    = ".json"
	tmpPrefix = ".tmp-"
)

var (
	// ErrNotFound is returned by Get for a key that has no value.
	ErrNotFound = errors.New("not found")
	// ErrBadKey is returned for keys that cannot name a file safely.
	ErrBadKey = errors.New("bad key")
)

// maxKeyLen bounds a key. validKey is `^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$` written out: a
// package-level regexp is compiled at the start of every kata-dp process, the CLI's included
// (and a bounded repetition into one copy of the class per repetition: 2600 allocations).
const maxKeyLen = 201

func validKey(key string) bool {
	if key == "" || len(key) > maxKeyLen {
		return false
	}
	for i := range len(key) {
		c := key[i]
		switch {
		case 'A' <= c && c <= 'Z', 'a' <= c && c <= 'z', '0' <= c && c <= '9':
		case i > 0 && (c == '_' || c == '.' || c == '-'):
		default:
			return false
		}
	}
	return true
}

// Store is a directory of files, one per key, each replaced atomically (see slots.go).
type Store struct {
	dir string

	mu   sync.Mutex
	keys map[string]*keyLock
}

// Open creates dir (mode 0700) when needed and removes temporary files left by interrupted
// writes.
func Open(dir string) (*Store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("open store %s: %w", dir, err)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("open store %s: %w", dir, err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), tmpPrefix) {
			if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return nil, fmt.Errorf("open store %s: remove leftover %s: %w", dir, e.Name(), err)
			}
		}
	}
	return &Store{dir: dir}, nil
}

// Dir returns the store's directory.
func (s *Store) Dir() string { return s.dir }

func (s *Store) path(key string) (string, error) {
	if !validKey(key) {
		return "", fmt.Errorf("%w: %q", ErrBadKey, key)
	}
	return filepath.Join(s.dir, key+suffix), nil
}

// Put replaces the value of key with data, atomically and durably: in place, in the slot
// not holding the current value, when the key's file has room (one fdatasync), else by
// writing the file whole.
func (s *Store) Put(key string, data []byte) error {
	path, err := s.path(key)
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	err = s.locked(key, func(k *keyLock) error {
		w, err := prepareWrite(path, k, data)
		if err != nil {
			return err
		}
		if w.f != nil {
			defer w.f.Close()
			if err := w.writeSlot(k); err != nil {
				return err
			}
			k.file.seq, k.file.newest = w.seq, w.target
			return nil
		}
		ino, err := s.writeWhole(key, path, w.rec, 2*w.size)
		if err != nil {
			k.file = nil
			return err
		}
		k.file = &slotFile{ino: ino, size: w.size, seq: w.seq, newest: 0}
		return nil
	})
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
}

// writeWhole replaces the file at path with b, extended to size bytes (a hole): a temporary
// file, fsynced, renamed over it, the directory fsynced. It returns the new file's inode
// number.
func (s *Store) writeWhole(key, path string, b []byte, size int64) (ino uint64, err error) {
	tmp, ino, err := s.writeTemp(key, b, size)
	if err != nil {
		return 0, err
	}
	if err := s.renameTemp(tmp, path); err != nil {
		return 0, err
	}
	return ino, nil
}

// writeTemp is writeWhole's first half: the temporary file, written and fsynced.
func (s *Store) writeTemp(key string, b []byte, size int64) (tmp string, ino uint64, err error) {
	f, err := os.CreateTemp(s.dir, tmpPrefix+key+"-*")
	if err != nil {
		return "", 0, err
	}
	tmp = f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(b); err != nil {
		return "", 0, fmt.Errorf("write: %w", err)
	}
	if err := f.Truncate(size); err != nil {
		return "", 0, fmt.Errorf("extend: %w", err)
	}
	if err := f.Sync(); err != nil {
		return "", 0, fmt.Errorf("fsync: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return "", 0, fmt.Errorf("stat: %w", err)
	}
	if err := f.Close(); err != nil {
		return "", 0, fmt.Errorf("close: %w", err)
	}
	return tmp, st.Ino, nil
}

// renameTemp is writeWhole's second half: the temporary file renamed over path, the
// directory fsynced. The temporary file is removed if the rename fails.
func (s *Store) renameTemp(tmp, path string) error {
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rename: %w", err)
	}
	return s.syncDir()
}

// Get returns the value of key, or ErrNotFound.
func (s *Store) Get(key string) ([]byte, error) {
	path, err := s.path(key)
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", key, err)
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("get %s: %w", key, ErrNotFound)
	}
	if err != nil {
		return nil, fmt.Errorf("get %s: %w", key, err)
	}
	if b, err = readValue(b); err != nil {
		return nil, fmt.Errorf("get %s: %w", key, err)
	}
	return b, nil
}

// readValue returns the value a file holds: the newest valid slot of a file of slots, or the
// file as it is when it was written whole (by an earlier version, or by hand).
func readValue(b []byte) ([]byte, error) {
	if !isSlots(b) || len(b)%2 != 0 {
		return b, nil
	}
	v, _, err := parseSlots(b)
	return v, err
}

// Delete removes key (and its journal) durably. Deleting a missing key is not an error.
func (s *Store) Delete(key string) error {
	path, err := s.path(key)
	if err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	// The journal first: a crash in between leaves the value without its journal, never a
	// journal that a later value of the same key would inherit.
	err = s.locked(key, func(k *keyLock) error {
		k.file = nil
		for _, p := range []string{strings.TrimSuffix(path, suffix) + journalSuffix, path} {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	if err := s.syncDir(); err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	return nil
}

// MoveAside renames the value of key to <key>.json.corrupt-<UTC timestamp> in the store's
// directory, where Keys no longer sees it: a value the caller cannot understand is kept for a
// human to inspect instead of stopping every later Load. It returns the new path.
func (s *Store) MoveAside(key string) (string, error) {
	path, err := s.path(key)
	if err != nil {
		return "", fmt.Errorf("move aside %s: %w", key, err)
	}
	to := path + ".corrupt-" + time.Now().UTC().Format("20060102T150405.000000000Z")
	err = s.locked(key, func(k *keyLock) error {
		k.file = nil
		return os.Rename(path, to)
	})
	if err != nil {
		return "", fmt.Errorf("move aside %s: %w", key, err)
	}
	if err := s.syncDir(); err != nil {
		return "", fmt.Errorf("move aside %s: %w", key, err)
	}
	return to, nil
}

// Keys lists the stored keys in order.
func (s *Store) Keys() ([]string, error) {
	ents, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", s.dir, err)
	}
	var keys []string
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || strings.HasPrefix(name, tmpPrefix) || !strings.HasSuffix(name, suffix) {
			continue
		}
		key := strings.TrimSuffix(name, suffix)
		if validKey(key) {
			keys = append(keys, key)
		}
	}
	sort.Strings(keys)
	return keys, nil
}

// Load returns every key with its value.
func (s *Store) Load() (map[string][]byte, error) {
	keys, err := s.Keys()
	if err != nil {
		return nil, err
	}
	out := make(map[string][]byte, len(keys))
	for _, k := range keys {
		b, err := s.Get(k)
		if errors.Is(err, ErrNotFound) {
			continue // deleted meanwhile
		}
		if err != nil {
			return nil, err
		}
		out[k] = b
	}
	return out, nil
}

func (s *Store) syncDir() error {
	d, err := os.Open(s.dir)
	if err != nil {
		return fmt.Errorf("fsync dir: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync dir: %w", err)
	}
	return nil
}
