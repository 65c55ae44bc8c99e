package cni

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestStore(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer st.close()
	a := record{Network: "net1", ContainerID: "c1", IfName: "eth0", NetNS: "/run/netns/c1", Socket: "/s", Tap: "tap0_kata", NIC: "eth0"}
	b := a
	b.Network, b.IfName, b.Tap, b.NIC = "net2", "net1", "tap1_kata", "net1"
	other := a
	other.ContainerID = "c2"
	for _, r := range []record{a, b, other} {
		if err := st.putRecord(r); err != nil {
			t.Fatal(err)
		}
	}
	if err := st.putOwner("c1", owner{NetNS: "/run/netns/c1", Socket: "/s"}); err != nil {
		t.Fatal(err)
	}
	got, err := st.getRecord("c1", "net2", "net1")
	if err != nil || got == nil {
		t.Fatalf("getRecord = %v, %v", got, err)
	}
	if diff := cmp.Diff(b, *got); diff != "" {
		t.Errorf("record (-want +got):\n%s", diff)
	}
	if got, err := st.getRecord("c1", "net3", "eth0"); got != nil || err != nil {
		t.Errorf("missing record = %v, %v; want nil, nil", got, err)
	}
	recs, err := st.records("c1")
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]record{a, b}, recs); diff != "" {
		t.Errorf("records of c1 (-want +got):\n%s", diff)
	}
	if all, err := st.records(""); err != nil || len(all) != 3 {
		t.Errorf("all records = %v, %v; want 3", all, err)
	}
	for _, r := range []record{a, b} {
		if err := st.delRecord(r); err != nil {
			t.Fatal(err)
		}
	}
	if o, err := st.getOwner("c1"); err != nil || o == nil || o.NetNS != "/run/netns/c1" {
		t.Errorf("owner = %+v, %v", o, err)
	}
	if err := st.delOwner("c1"); err != nil {
		t.Fatal(err)
	}
	if err := st.delOwner("c1"); err != nil {
		t.Errorf("second delOwner: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "c1")); !os.IsNotExist(err) {
		t.Errorf("container directory after the last record and the marker went: %v; want it gone", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "c2")); err != nil {
		t.Errorf("another container's directory: %v", err)
	}
}

func TestStoreLock(t *testing.T) {
	dir := t.TempDir()
	st, err := openStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	got := make(chan *store)
	go func() {
		s2, err := openStore(dir)
		if err != nil {
			t.Error(err)
		}
		got <- s2
	}()
	select {
	case <-got:
		t.Fatal("a second command took the lock while the first held it")
	case <-time.After(100 * time.Millisecond):
	}
	st.close()
	select {
	case s2 := <-got:
		if s2 != nil {
			s2.close()
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the lock was not handed over")
	}
}
