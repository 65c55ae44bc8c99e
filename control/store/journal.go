package store

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
)

// journalSuffix names a key's journal, <key>.journal, beside its value <key>.json (Keys lists
// only values).
const journalSuffix = ".journal"

// A journal is a key's log of small changes since its value was last written whole: a caller
// whose value is large (the kata-ipvs table of 20000 rules, about 2 MB of JSON) appends one
// record per change, which costs one fsync of a few bytes, instead of rewriting the whole
// value on every change, and writes the value whole (Put, then DropJournal) once in a while.
// Records are newline-terminated and must not contain a newline. A record is durable when
// Append returns; one torn by a crash mid-append was never acknowledged and is not returned
// by Journal.

func (s *Store) journalPath(key string) (string, error) {
	if !validKey(key) {
		return "", fmt.Errorf("%w: %q", ErrBadKey, key)
	}
	return filepath.Join(s.dir, key+journalSuffix), nil
}

// Append adds rec to key's journal durably.
func (s *Store) Append(key string, rec []byte) error {
	path, err := s.journalPath(key)
	if err != nil {
		return fmt.Errorf("append %s: %w", key, err)
	}
	if bytes.IndexByte(rec, '\n') >= 0 {
		return fmt.Errorf("append %s: the record contains a newline", key)
	}
	_, statErr := os.Lstat(path)
	created := errors.Is(statErr, fs.ErrNotExist)
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("append %s: %w", key, err)
	}
	off, werr := f.Seek(0, io.SeekEnd)
	if werr == nil {
		_, werr = f.Write(append(rec[:len(rec):len(rec)], '\n'))
	}
	if werr == nil {
		werr = f.Sync()
	}
	if werr != nil && off > 0 {
		// The record may be half written: a later Journal would drop a torn last record,
		// but the next Append would glue its record to it. Cut the file back.
		f.Truncate(off)
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("append %s: %w", key, werr)
	}
	if created {
		if err := s.syncDir(); err != nil {
			return fmt.Errorf("append %s: %w", key, err)
		}
	}
	return nil
}

// Journal returns key's journal records in the order they were appended (none when it has no
// journal). A last record without its newline (torn by a crash) is left out.
func (s *Store) Journal(key string) ([][]byte, error) {
	path, err := s.journalPath(key)
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", key, err)
	}
	b, err := os.ReadFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", key, err)
	}
	var recs [][]byte
	for len(b) > 0 {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			break // torn by a crash: never acknowledged
		}
		recs = append(recs, b[:i])
		b = b[i+1:]
	}
	return recs, nil
}

// DropJournal removes key's journal durably (after its value was written whole).
func (s *Store) DropJournal(key string) error {
	path, err := s.journalPath(key)
	if err != nil {
		return fmt.Errorf("drop journal %s: %w", key, err)
	}
	if err := os.Remove(path); err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		return fmt.Errorf("drop journal %s: %w", key, err)
	}
	if err := s.syncDir(); err != nil {
		return fmt.Errorf("drop journal %s: %w", key, err)
	}
	return nil
}
