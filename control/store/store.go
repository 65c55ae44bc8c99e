package store

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"time"
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

var keyRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$`)

// Store is a directory of atomically replaced files.
type Store struct {
	dir string
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
	if !keyRE.MatchString(key) {
		return "", fmt.Errorf("%w: %q", ErrBadKey, key)
	}
	return filepath.Join(s.dir, key+suffix), nil
}

// Put replaces the value of key with data, atomically and durably.
func (s *Store) Put(key string, data []byte) (err error) {
	path, err := s.path(key)
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	f, err := os.CreateTemp(s.dir, tmpPrefix+key+"-*")
	if err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	if _, err := f.Write(data); err != nil {
		return fmt.Errorf("put %s: write: %w", key, err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("put %s: fsync: %w", key, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("put %s: close: %w", key, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("put %s: rename: %w", key, err)
	}
	if err := s.syncDir(); err != nil {
		return fmt.Errorf("put %s: %w", key, err)
	}
	return nil
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
	return b, nil
}

// Delete removes key (and its journal) durably. Deleting a missing key is not an error.
func (s *Store) Delete(key string) error {
	path, err := s.path(key)
	if err != nil {
		return fmt.Errorf("delete %s: %w", key, err)
	}
	// The journal first: a crash in between leaves the value without its journal, never a
	// journal that a later value of the same key would inherit.
	for _, p := range []string{strings.TrimSuffix(path, suffix) + journalSuffix, path} {
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("delete %s: %w", key, err)
		}
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
	if err := os.Rename(path, to); err != nil {
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
		if keyRE.MatchString(key) {
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
