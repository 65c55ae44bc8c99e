// Package watch runs the agent's long-running node work: periodic and event-driven tasks such
// as the load balancer's connection sweeper and the XDP recheck today, and Kata discovery, the
// per-sandbox netlink watcher and garbage collection next. Each task is a one-shot function
// (do the work once, return an error) plus when to run it; the Group owns the loops, so every
// task starts and stops with the agent's context, logs its failures under its name, and is
// waited for on shutdown (no task touches the dataplane after the agent closed it).
//
// A task's runs never overlap: each task has one goroutine, which runs it on its ticker and on
// its trigger. A failing run is logged and the task keeps its schedule; a panicking run is
// recovered, logged and counted as a failure, so one task's bug does not stop the agent (the
// datapath keeps forwarding) or the other tasks.
//
// A Group is built (Add) by one goroutine, then started once; Start's stop function may be
// called from any goroutine, more than once.
package watch

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"sync"
	"time"
)

// Task is one piece of node work.
type Task struct {
	// Name names the task in logs (e.g. "lb-sweep"); unique within a Group.
	Name string
	// Every, when positive, runs the task periodically, Every apart (the first run one period
	// after the start).
	Every time.Duration
	// Trigger, when set, also runs the task each time a value arrives (events: a netlink
	// message, a new sandbox). A closed Trigger is no longer watched.
	Trigger <-chan struct{}
	// Run does the work once. With neither Every nor Trigger, Run is the whole task: a loop
	// that returns when ctx ends (a netlink watcher); if it returns before, its error is
	// logged and it is started again after RetryAfter.
	Run func(ctx context.Context) error
	// RetryAfter is the pause before a loop task (no Every, no Trigger) that returned early is
	// started again; 0 means one second.
	RetryAfter time.Duration
}

// Group runs a set of tasks.
type Group struct {
	log     *slog.Logger
	tasks   []Task
	names   map[string]bool
	started bool
}

// New returns an empty Group that logs with log (nil: slog.Default()).
func New(log *slog.Logger) *Group {
	return &Group{log: cmp.Or(log, slog.Default()), names: map[string]bool{}}
}

// Errors of Add.
var (
	// ErrInvalidTask: the task has no name, no Run, a negative period, or a name in use.
	ErrInvalidTask = errors.New("invalid task")
	// ErrStarted: the Group was already started.
	ErrStarted = errors.New("watch group already started")
)

// Add adds a task; it must be called before Start.
func (g *Group) Add(t Task) error {
	switch {
	case g.started:
		return fmt.Errorf("add task %q: %w", t.Name, ErrStarted)
	case t.Name == "":
		return fmt.Errorf("add task: %w: no name", ErrInvalidTask)
	case t.Run == nil:
		return fmt.Errorf("add task %q: %w: no Run", t.Name, ErrInvalidTask)
	case t.Every < 0 || t.RetryAfter < 0:
		return fmt.Errorf("add task %q: %w: negative period", t.Name, ErrInvalidTask)
	case g.names[t.Name]:
		return fmt.Errorf("add task %q: %w: name in use", t.Name, ErrInvalidTask)
	}
	g.names[t.Name] = true
	g.tasks = append(g.tasks, t)
	return nil
}

// Start runs every task until ctx ends or stop is called. stop cancels the tasks and waits
// until each has returned.
func (g *Group) Start(ctx context.Context) (stop func()) {
	g.started = true
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	for _, t := range g.tasks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g.loop(ctx, t)
		}()
	}
	g.log.Debug("node tasks started", "tasks", len(g.tasks))
	return func() {
		cancel()
		wg.Wait()
	}
}

// loop runs one task until ctx ends.
func (g *Group) loop(ctx context.Context, t Task) {
	if t.Every == 0 && t.Trigger == nil {
		retry := time.NewTimer(0)
		defer retry.Stop()
		for {
			select {
			case <-ctx.Done():
				return
			case <-retry.C:
			}
			if ctx.Err() != nil {
				return // select picks at random when both are ready
			}
			err := g.run(ctx, t)
			if ctx.Err() != nil {
				return
			}
			if err == nil {
				err = errors.New("returned before the agent stopped")
			}
			g.log.Error("node task failed", "task", t.Name, "err", err)
			retry.Reset(cmp.Or(t.RetryAfter, time.Second))
		}
	}
	var tick <-chan time.Time
	if t.Every > 0 {
		tk := time.NewTicker(t.Every)
		defer tk.Stop()
		tick = tk.C
	}
	trigger := t.Trigger
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
		case _, ok := <-trigger:
			if !ok {
				trigger = nil // a nil channel is never ready
				if tick == nil {
					<-ctx.Done()
					return
				}
				continue
			}
		}
		if ctx.Err() != nil {
			return // select picks at random when several cases are ready: no run after stop
		}
		if err := g.run(ctx, t); err != nil && ctx.Err() == nil {
			g.log.Warn("node task failed", "task", t.Name, "err", err)
		}
	}
}

// run runs t once, turning a panic into an error.
func (g *Group) run(ctx context.Context, t Task) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("panic: %v\n%s", p, debug.Stack())
		}
	}()
	return t.Run(ctx)
}
