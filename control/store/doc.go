// Package store keeps kata-dp's state on disk so that it survives crashes: a directory
// (default /var/lib/kata-dp) of small files, one per key, <key>.json.
//
// A key's file holds two slots, each a header (sequence number, length, CRC-32C) and a copy
// of the value; a read takes the valid slot with the highest sequence number (slots.go). The
// first write of a key, and a write that outgrows its slot, make the file whole: a temporary
// file in the same directory, fsynced, renamed over the old file, the directory fsynced.
// Every other write overwrites the slot that does not hold the current value, in place, and
// fdatasyncs it (the file keeps its size, so no metadata is flushed): one cheap flush instead
// of two journal commits. Either way a `kill -9` or a power cut at any moment leaves the old
// value or the new one readable under the key, never a mix: a torn slot fails its checksum and
// the other slot is read. Files written whole by earlier versions (plain JSON) are read as they
// are. Leftover temporary files of an interrupted write are removed by Open.
//
// A Store is safe for concurrent use; writes to different keys proceed in parallel, writes to
// one key are serialised (the caller holds a per-sandbox lock too).
package store
