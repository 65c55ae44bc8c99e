package main

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// TestInstall: the plugin lands in the directory executable, replacing an older one, with no
// temporary file left; a missing directory is an error naming it.
func TestInstall(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(t.TempDir(), "plugin")
	if err := os.WriteFile(src, []byte("new binary"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "kata-dp-cni"), []byte("old"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := install(src, dir); err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, "kata-dp-cni")
	b, err := os.ReadFile(dst)
	if err != nil || !bytes.Equal(b, []byte("new binary")) {
		t.Errorf("installed: %q %v", b, err)
	}
	if st, _ := os.Stat(dst); st == nil || st.Mode().Perm() != 0o755 {
		t.Errorf("mode: %v", st)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 1 {
		t.Errorf("left in %s: %v", dir, entries)
	}
	if err := install(src, filepath.Join(dir, "absent")); err == nil {
		t.Error("install into a missing directory succeeded")
	}
}
