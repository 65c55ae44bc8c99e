// Package store keeps kata-dp's state on disk so that it survives crashes: a directory
// (default /var/lib/kata-dp) of small files, one per key, each written whole.
//
// A write goes to a temporary file in the same directory, is fsynced, renamed over the old
// file and the directory is fsynced, so a `kill -9` or a power cut at any moment leaves either
// the old content or the new one under the key, never a mix and never a torn file. Leftover
// temporary files of an interrupted write are removed by Open.
//
// A Store is safe for concurrent use; writes to different keys proceed in parallel, writes to
// one key are serialised by the caller (control holds a per-sandbox lock).
package store
