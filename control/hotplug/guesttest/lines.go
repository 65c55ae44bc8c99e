package guesttest

import (
	"context"
	"errors"
	"strings"
	"sync"
)

// errEnded is lineLog.wait's error when the process ended without the line.
var errEnded = errors.New("the process ended")

// lineLog is a process's output line by line (the guest's serial console, testpmd's output),
// for tests that wait for a marker: a waiter wakes at every new line and when the process
// exits, and looks once more after the exit, since the last lines come with it.
type lineLog struct {
	exited <-chan struct{}

	mu     sync.Mutex
	lines  []string
	notify chan struct{} // closed and replaced when a line arrives or the process exits
}

func newLineLog(exited <-chan struct{}) *lineLog {
	return &lineLog{exited: exited, notify: make(chan struct{})}
}

func (l *lineLog) add(line string) {
	l.mu.Lock()
	l.lines = append(l.lines, line)
	l.mu.Unlock()
	l.wake()
}

// wake wakes the waiters; the process's reaper calls it after closing exited.
func (l *lineLog) wake() {
	l.mu.Lock()
	close(l.notify)
	l.notify = make(chan struct{})
	l.mu.Unlock()
}

// len is the number of lines so far.
func (l *lineLog) len() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.lines)
}

// text is every line so far, each ended by a newline.
func (l *lineLog) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n") + "\n"
}

// find looks for a line containing substr from index from on, and returns it with its
// index; notify is the channel to wait on when there is none yet.
func (l *lineLog) find(from int, substr string) (line string, idx int, ok bool, notify <-chan struct{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := from; i < len(l.lines); i++ {
		if strings.Contains(l.lines[i], substr) {
			return l.lines[i], i, true, nil
		}
	}
	return "", 0, false, l.notify
}

// wait waits for a line containing substr from index from on and returns it with its index;
// errEnded when the process exited without it, ctx's error when ctx ends first.
func (l *lineLog) wait(ctx context.Context, from int, substr string) (string, int, error) {
	for {
		line, i, ok, notify := l.find(from, substr)
		if ok {
			return line, i, nil
		}
		select {
		case <-l.exited:
			if line, i, ok, _ := l.find(from, substr); ok {
				return line, i, nil
			}
			return "", 0, errEnded
		case <-notify:
		case <-ctx.Done():
			return "", 0, ctx.Err()
		}
	}
}
