package dataplane_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/loader"
	"github.com/kata-dp/kata-dp/maps"
)

// TestMonitorStreams: the datapath reports the union of what the open streams of a sandbox
// ask and nothing once the last is closed; a sandbox removed under an open stream leaves the
// stream closable (no use of closed descriptors: TestMain counts them); an unknown sandbox is
// ErrNoSandbox.
func TestMonitorStreams(t *testing.T) {
	topotest.RequireRoot(t, "loads BPF programs")
	root := filepath.Join("/sys/fs/bpf", fmt.Sprintf("kdpt-dpmon-%08x", rand.Uint32()))
	t.Cleanup(func() { os.RemoveAll(root) })
	dp, err := dataplane.New(root)
	if err != nil {
		t.Fatal(err)
	}
	defer dp.Close()
	ctx := context.Background()
	if err := dp.EnsureSandbox(ctx, "mon", "/proc/self/ns/net"); err != nil {
		t.Fatal(err)
	}
	pins, err := loader.Open(root, "mon") // a second view of the pinned maps, to read the flags
	if err != nil {
		t.Fatal(err)
	}
	defer pins.Close()
	flags := func() maps.MonitorFlags {
		t.Helper()
		f, err := maps.MonitorConfig{Map: pins.Maps().Mon}.Flags()
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	if f := flags(); f != 0 {
		t.Fatalf("flags %v before any stream", f)
	}
	s1, err := dp.Monitor(ctx, "mon", maps.MonitorDrop)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := dp.Monitor(ctx, "mon", maps.MonitorDrop|maps.MonitorTrace)
	if err != nil {
		t.Fatal(err)
	}
	if f := flags(); f != maps.MonitorDrop|maps.MonitorTrace {
		t.Errorf("flags %v with two streams, want drop|trace", f)
	}
	if err := s2.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s2.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if f := flags(); f != maps.MonitorDrop {
		t.Errorf("flags %v after the trace stream closed, want drop", f)
	}
	s1.SetDeadline(time.Now().Add(10 * time.Millisecond))
	if _, err := s1.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("Read with nothing to read = %v, want a deadline error", err)
	}
	if n, err := s1.Suppressed(); err != nil || n != 0 {
		t.Errorf("Suppressed = %d, %v", n, err)
	}
	if err := s1.Close(); err != nil {
		t.Fatal(err)
	}
	if f := flags(); f != 0 {
		t.Errorf("flags %v after the last stream closed, want 0", f)
	}

	s3, err := dp.Monitor(ctx, "mon", maps.MonitorLB)
	if err != nil {
		t.Fatal(err)
	}
	if err := dp.RemoveSandbox(ctx, "mon"); err != nil {
		t.Fatal(err)
	}
	s3.SetDeadline(time.Now().Add(10 * time.Millisecond))
	if _, err := s3.Read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("Read after the sandbox went = %v, want a deadline error", err)
	}
	if err := s3.Close(); err != nil {
		t.Errorf("Close after the sandbox went: %v", err)
	}
	if _, err := dp.Monitor(ctx, "mon", maps.MonitorDrop); !errors.Is(err, dataplane.ErrNoSandbox) {
		t.Errorf("Monitor of a removed sandbox = %v, want ErrNoSandbox", err)
	}
}
