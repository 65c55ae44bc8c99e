package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// record is what ADD made for one attachment, written before the agent is asked to change
// anything, so that a DEL after a failed or interrupted ADD knows what to look for.
type record struct {
	Network     string `json:"network"`
	ContainerID string `json:"containerID"`
	IfName      string `json:"ifName"`
	NetNS       string `json:"netns"`
	Socket      string `json:"socket"`
	Tap         string `json:"tap"`
	NIC         string `json:"nic"` // the guest NIC name in the agent (the CNI ifname)
}

// owner is the marker of a sandbox the plugin registered in the agent.
type owner struct {
	NetNS  string `json:"netns"`
	Socket string `json:"socket"`
}

const (
	lockFile   = "lock"
	ownerFile  = "sandbox"
	recordExt  = ".json"
	recordSep  = "=" // network names never hold it, so "<network>=<ifname>.json" is unambiguous
	tmpPattern = ".tmp-*"
)

// store is the plugin's state directory, locked for the life of one command:
//
//	<dir>/lock                                  flock(LOCK_EX) held by the running command
//	<dir>/<containerID>/sandbox                 owner: this plugin registered the sandbox
//	<dir>/<containerID>/<network>=<ifname>.json record of one attachment
type store struct {
	dir  string
	lock *os.File
}

// openStore creates the directory if needed and takes its lock (waiting for other commands).
func openStore(dir string) (*store, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if !errors.Is(err, unix.EINTR) {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("state dir: lock: %w", err)
	}
	return &store{dir: dir, lock: f}, nil
}

// close releases the lock.
func (s *store) close() { s.lock.Close() }

func (s *store) containerDir(cid string) string { return filepath.Join(s.dir, cid) }

func (s *store) recordPath(cid, network, ifname string) string {
	return filepath.Join(s.containerDir(cid), network+recordSep+ifname+recordExt)
}

// writeJSON writes v to path atomically (temporary file, fsync, rename).
func writeJSON(path string, v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, tmpPattern)
	if err != nil {
		return err
	}
	defer os.Remove(f.Name()) // a no-op after the rename
	if _, err := f.Write(b); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}

// readJSON reads path into v; a missing file is (false, nil).
func readJSON(path string, v any) (bool, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if err := json.Unmarshal(b, v); err != nil {
		return false, fmt.Errorf("%s: %w", path, err)
	}
	return true, nil
}

func (s *store) putRecord(r record) error {
	if err := writeJSON(s.recordPath(r.ContainerID, r.Network, r.IfName), r); err != nil {
		return fmt.Errorf("save attachment record: %w", err)
	}
	return nil
}

// getRecord returns the record of an attachment, or nil.
func (s *store) getRecord(cid, network, ifname string) (*record, error) {
	var r record
	ok, err := readJSON(s.recordPath(cid, network, ifname), &r)
	if err != nil || !ok {
		return nil, err
	}
	return &r, nil
}

// delRecord removes an attachment's record, and the container's directory when nothing else
// is left in it.
func (s *store) delRecord(r record) error {
	if err := os.Remove(s.recordPath(r.ContainerID, r.Network, r.IfName)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove attachment record: %w", err)
	}
	s.tidy(r.ContainerID)
	return nil
}

// records lists the attachment records of a container ("" = of every container).
func (s *store) records(cid string) ([]record, error) {
	pattern := filepath.Join(s.dir, "*", "*"+recordSep+"*"+recordExt)
	if cid != "" {
		pattern = filepath.Join(s.containerDir(cid), "*"+recordSep+"*"+recordExt)
	}
	paths, err := filepath.Glob(pattern)
	if err != nil {
		return nil, err
	}
	var out []record
	for _, p := range paths {
		var r record
		ok, err := readJSON(p, &r)
		if err != nil {
			return nil, fmt.Errorf("read attachment record: %w", err)
		}
		if ok {
			out = append(out, r)
		}
	}
	return out, nil
}

func (s *store) putOwner(cid string, o owner) error {
	if err := writeJSON(filepath.Join(s.containerDir(cid), ownerFile), o); err != nil {
		return fmt.Errorf("save sandbox marker: %w", err)
	}
	return nil
}

// getOwner returns the marker of a sandbox the plugin registered, or nil.
func (s *store) getOwner(cid string) (*owner, error) {
	var o owner
	ok, err := readJSON(filepath.Join(s.containerDir(cid), ownerFile), &o)
	if err != nil || !ok {
		return nil, err
	}
	return &o, nil
}

func (s *store) delOwner(cid string) error {
	if err := os.Remove(filepath.Join(s.containerDir(cid), ownerFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("remove sandbox marker: %w", err)
	}
	s.tidy(cid)
	return nil
}

// tidy removes a container's directory once it is empty (left-over temporary files of a
// crashed writer included).
func (s *store) tidy(cid string) {
	dir := s.containerDir(cid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		if !strings.HasPrefix(e.Name(), ".tmp-") {
			return
		}
	}
	os.RemoveAll(dir)
}
