package main

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/watch"
)

// TestAgentRunsNodeTasks: the agent runs its dependencies' node tasks (control/watch) from its
// start, logs a failing one under its name, and stops every task before it closes the
// dataplane.
func TestAgentRunsNodeTasks(t *testing.T) {
	dir := t.TempDir()
	trigger := make(chan struct{})
	ran := make(chan struct{})
	loopStarted := make(chan struct{})
	var stopped atomic.Bool
	closedAfterStop := make(chan bool, 1)
	stderr := &syncBuffer{}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ready := make(chan struct{})
	e := &env{ctx: ctx, stdin: strings.NewReader(""), stdout: &syncBuffer{}, stderr: stderr, getenv: func(string) string { return "" },
		args: []string{"agent", "--socket", filepath.Join(dir, "kata-dp.sock"), "--state-dir", filepath.Join(dir, "state"), "--log-level", "warn"},
		newDeps: func(context.Context, agentOptions) (agentDeps, error) {
			return agentDeps{Dataplane: controltest.NewMemDataplane(), Taps: controltest.NewMemTaps(),
				Tasks: []watch.Task{
					{Name: "probe-fails", Trigger: trigger, Run: func(context.Context) error {
						ran <- struct{}{}
						return errors.New("map gone")
					}},
					{Name: "probe-loop", Run: func(ctx context.Context) error {
						close(loopStarted)
						<-ctx.Done()
						stopped.Store(true)
						return nil
					}},
				},
				Close: func() error {
					closedAfterStop <- stopped.Load()
					return nil
				}}, nil
		},
		ready: func() { close(ready) },
	}
	done := make(chan error, 1)
	go func() { done <- run(e) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("agent did not start: %v\n%s", err, stderr)
	}
	trigger <- struct{}{}
	<-ran
	trigger <- struct{}{} // the first run's failure was logged before the second run starts
	<-ran
	<-loopStarted
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("agent: %v\n%s", err, stderr)
	}
	if !<-closedAfterStop {
		t.Error("the dataplane was closed while a node task still ran")
	}
	if !strings.Contains(stderr.String(), `task=probe-fails err="map gone"`) {
		t.Errorf("failing task not logged:\n%s", stderr)
	}
}
