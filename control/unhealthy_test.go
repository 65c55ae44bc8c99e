package control_test

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/store"
)

// eioStore is a store whose value of one key cannot be read (an I/O error), as on a failing disk.
type eioStore struct {
	*store.Store
	bad string
}

func (s eioStore) Get(key string) ([]byte, error) {
	if key == s.bad {
		return nil, &os.PathError{Op: "read", Path: key + ".json", Err: syscall.EIO}
	}
	return s.Store.Get(key)
}

func (s eioStore) Load() (map[string][]byte, error) {
	return nil, errors.New("Load must not be used when Keys and Get are there")
}

// TestUnreadableStateFileDoesNotBlockStart: one state file that cannot be read (EIO) makes
// that sandbox unhealthy and moved aside; the agent starts and the other sandboxes work.
func TestUnreadableStateFileDoesNotBlockStart(t *testing.T) {
	w := newWorld(t)
	c := w.start(t)
	for _, id := range []string{"good1", "bad1"} {
		if _, err := c.AddSandbox(context.Background(), control.SandboxSpec{ID: id, NetNS: testNS}); err != nil {
			t.Fatal(err)
		}
	}
	s, err := store.Open(w.dir)
	if err != nil {
		t.Fatal(err)
	}
	c, err = control.New(context.Background(), control.Config{Dataplane: w.dp, Taps: w.taps, Store: eioStore{s, "bad1"},
		CheckNetNS: func(string) error { return nil }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatalf("start with an unreadable state file: %v", err)
	}
	u := c.Unhealthy()
	if !strings.Contains(u["bad1"], "state unreadable") || !strings.Contains(u["bad1"], "input/output error") || u["good1"] != "" {
		t.Errorf("unhealthy = %v, want bad1 unreadable (EIO) and good1 healthy", u)
	}
	if _, err := c.Health(context.Background(), "good1"); err != nil {
		t.Errorf("good1: %v", err)
	}
	if m, _ := filepath.Glob(filepath.Join(w.dir, "bad1.json.corrupt-*")); len(m) != 1 {
		t.Errorf("unreadable state not moved aside: %v", m)
	}
	if err := c.DelSandbox(context.Background(), "bad1"); err != nil {
		t.Errorf("delete the unhealthy sandbox: %v", err)
	}
}

// TestUnhealthyRetried: a sandbox that could not be re-adopted at start (its netns was not
// there yet) is retried with backoff and healthy again once it can be.
func TestUnhealthyRetried(t *testing.T) {
	w := newWorld(t)
	c := w.start(t)
	if _, err := c.AddSandbox(context.Background(), control.SandboxSpec{ID: "late1", NetNS: testNS}); err != nil {
		t.Fatal(err)
	}
	s, err := store.Open(w.dir)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu        sync.Mutex
		nsUp      bool
		readopted []string
		clock     = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	)
	c, err = control.New(context.Background(), control.Config{Dataplane: w.dp, Taps: w.taps, Store: s,
		CheckNetNS: func(string) error {
			mu.Lock()
			defer mu.Unlock()
			if !nsUp {
				return errors.New("no such file or directory")
			}
			return nil
		},
		Now:                func() time.Time { mu.Lock(); defer mu.Unlock(); return clock },
		OnSandboxReadopted: func(id string) { mu.Lock(); readopted = append(readopted, id); mu.Unlock() },
		Logger:             slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		t.Fatal(err)
	}
	if u := c.Unhealthy(); !strings.Contains(u["late1"], "netns") {
		t.Fatalf("unhealthy = %v, want late1 (netns)", u)
	}
	advance := func(d time.Duration) { mu.Lock(); clock = clock.Add(d); mu.Unlock() }

	// Due after RetryBackoffMin; still failing: the next try waits twice as long.
	if err := c.RetryUnhealthy(context.Background()); err != nil {
		t.Errorf("retry before the backoff: %v (nothing is due)", err)
	}
	advance(control.RetryBackoffMin)
	if err := c.RetryUnhealthy(context.Background()); err == nil || !strings.Contains(err.Error(), "late1") {
		t.Errorf("retry with the netns still gone: %v, want late1's error", err)
	}
	advance(control.RetryBackoffMin)
	mu.Lock()
	nsUp = true
	mu.Unlock()
	if err := c.RetryUnhealthy(context.Background()); err != nil {
		t.Errorf("retry: %v (not due yet: backoff doubled)", err)
	}
	if u := c.Unhealthy(); u["late1"] == "" {
		t.Error("re-adopted before the doubled backoff was due")
	}
	advance(control.RetryBackoffMin)
	if err := c.RetryUnhealthy(context.Background()); err != nil {
		t.Fatalf("retry with the netns back: %v", err)
	}
	if u := c.Unhealthy(); len(u) != 0 {
		t.Errorf("unhealthy after re-adoption: %v", u)
	}
	mu.Lock()
	if len(readopted) != 1 || readopted[0] != "late1" {
		t.Errorf("OnSandboxReadopted calls %v, want [late1] (once, after the successful retry)", readopted)
	}
	mu.Unlock()
	if _, err := c.Health(context.Background(), "late1"); err != nil {
		t.Errorf("health after re-adoption: %v", err)
	}
}
