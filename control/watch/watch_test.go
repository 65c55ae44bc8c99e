package watch_test

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/control/watch"
)

// logBuf collects a Group's log lines.
type logBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func newGroup(t *testing.T) (*watch.Group, *logBuf) {
	t.Helper()
	lb := &logBuf{}
	return watch.New(slog.New(slog.NewTextHandler(lb, &slog.HandlerOptions{Level: slog.LevelDebug}))), lb
}

func mustAdd(t *testing.T, g *watch.Group, task watch.Task) {
	t.Helper()
	if err := g.Add(task); err != nil {
		t.Fatal(err)
	}
}

// TestFailingTaskKeepsRunning: a run that fails is logged with the task's name and the task
// runs again at its next trigger; a panicking run is recovered and logged the same way.
func TestFailingTaskKeepsRunning(t *testing.T) {
	g, log := newGroup(t)
	trigger := make(chan struct{})
	ran := make(chan int)
	n := 0
	mustAdd(t, g, watch.Task{Name: "flaky", Trigger: trigger, Run: func(context.Context) error {
		n++
		defer func() { ran <- n }()
		switch n {
		case 1:
			return errors.New("disk on fire")
		case 2:
			panic("nil map")
		}
		return nil
	}})
	stop := g.Start(context.Background())
	defer stop()
	for want := 1; want <= 3; want++ {
		trigger <- struct{}{}
		if got := <-ran; got != want {
			t.Fatalf("run %d, want %d", got, want)
		}
	}
	// Run 3 started after runs 1 and 2 were logged (one goroutine per task); stop waits for
	// run 3 to return.
	stop()
	out := log.String()
	for _, want := range []string{`task=flaky err="disk on fire"`, `task=flaky err="panic: nil map`} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %q:\n%s", want, out)
		}
	}
	if c := strings.Count(out, "node task failed"); c != 2 {
		t.Errorf("%d failures logged, want 2:\n%s", c, out)
	}
}

// TestPeriodic: a task with Every runs again and again, never two runs at once.
func TestPeriodic(t *testing.T) {
	g, _ := newGroup(t)
	ran := make(chan struct{})
	var running atomic.Int32
	mustAdd(t, g, watch.Task{Name: "tick", Every: time.Millisecond, Run: func(ctx context.Context) error {
		if running.Add(1) != 1 {
			t.Error("two runs at once")
		}
		defer running.Add(-1)
		select {
		case ran <- struct{}{}:
		case <-ctx.Done():
		}
		return nil
	}})
	stop := g.Start(context.Background())
	for range 3 {
		<-ran
	}
	stop()
}

// TestStopWaitsForEveryTask: stop (and cancelling the agent's context) ends every task, and
// returns only when each has returned.
func TestStopWaitsForEveryTask(t *testing.T) {
	for _, how := range []string{"stop", "cancel"} {
		t.Run(how, func(t *testing.T) {
			g, _ := newGroup(t)
			var returned atomic.Int32
			started := make(chan struct{}, 3)
			block := func(ctx context.Context) error {
				started <- struct{}{}
				<-ctx.Done()
				returned.Add(1)
				return ctx.Err()
			}
			trigger := make(chan struct{}, 1)
			trigger <- struct{}{}
			mustAdd(t, g, watch.Task{Name: "loop", Run: block})
			mustAdd(t, g, watch.Task{Name: "periodic", Every: time.Millisecond, Run: block})
			mustAdd(t, g, watch.Task{Name: "event", Trigger: trigger, Run: block})
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			stop := g.Start(ctx)
			for range 3 {
				<-started
			}
			if how == "cancel" {
				cancel()
			}
			stop()
			if n := returned.Load(); n != 3 {
				t.Errorf("%d tasks returned when stop returned, want 3", n)
			}
			stop() // a second stop is harmless
		})
	}
}

// TestLoopTaskRestarted: a loop task (no Every, no Trigger) that returns while the agent runs
// is logged and started again.
func TestLoopTaskRestarted(t *testing.T) {
	g, log := newGroup(t)
	ran := make(chan int)
	n := 0
	mustAdd(t, g, watch.Task{Name: "netmon", RetryAfter: time.Nanosecond, Run: func(ctx context.Context) error {
		n++
		ran <- n
		if n < 3 {
			return errors.New("netlink socket closed")
		}
		<-ctx.Done()
		return nil
	}})
	stop := g.Start(context.Background())
	for want := 1; want <= 3; want++ {
		if got := <-ran; got != want {
			t.Fatalf("start %d, want %d", got, want)
		}
	}
	stop()
	if c := strings.Count(log.String(), `task=netmon err="netlink socket closed"`); c != 2 {
		t.Errorf("%d failures logged, want 2:\n%s", c, log)
	}
}

// TestClosedTrigger: a closed trigger is no longer watched and does not spin the task.
func TestClosedTrigger(t *testing.T) {
	g, _ := newGroup(t)
	trigger := make(chan struct{})
	var runs atomic.Int32
	mustAdd(t, g, watch.Task{Name: "ev", Trigger: trigger, Run: func(context.Context) error {
		runs.Add(1)
		return nil
	}})
	stop := g.Start(context.Background())
	close(trigger)
	stop()
	if n := runs.Load(); n != 0 {
		t.Errorf("%d runs after the trigger closed, want 0", n)
	}
}

func TestAdd(t *testing.T) {
	g, _ := newGroup(t)
	run := func(context.Context) error { return nil }
	mustAdd(t, g, watch.Task{Name: "a", Every: time.Second, Run: run})
	for _, bad := range []watch.Task{
		{Run: run},
		{Name: "b"},
		{Name: "c", Every: -1, Run: run},
		{Name: "a", Run: run},
	} {
		if err := g.Add(bad); !errors.Is(err, watch.ErrInvalidTask) {
			t.Errorf("Add(%+v) = %v, want ErrInvalidTask", bad, err)
		}
	}
	stop := g.Start(context.Background())
	defer stop()
	if err := g.Add(watch.Task{Name: "late", Run: run}); !errors.Is(err, watch.ErrStarted) {
		t.Errorf("Add after Start = %v", err)
	}
}
