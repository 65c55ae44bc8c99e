package qmp

import (
	"context"
	"sync"
)

// Subscription queues the events a Client receives from the moment Subscribe returns until
// Close. It never blocks the client: events beyond an internal bound drop the oldest.
type Subscription struct {
	c     *Client
	names map[string]bool // nil: every event

	mu     sync.Mutex
	queue  []Event
	lost   bool  // the connection was lost since Subscribe; reported once by Next
	err    error // the subscription ended (ErrClosed)
	notify chan struct{}
}

// Subscribe returns a subscription to the named events (every event when no name is given).
// Call Close when done.
func (c *Client) Subscribe(names ...string) *Subscription {
	s := &Subscription{c: c, notify: make(chan struct{}, 1)}
	if len(names) > 0 {
		s.names = make(map[string]bool, len(names))
		for _, n := range names {
			s.names[n] = true
		}
	}
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		s.err = ErrClosed
		return s
	}
	c.subMu.Lock()
	c.subs[s] = struct{}{}
	c.subMu.Unlock()
	return s
}

// Next returns the next queued event, waiting for one until ctx ends. It returns
// ErrDisconnected (once) when the monitor connection was lost after Subscribe and the events
// queued before that are consumed, since events may have been missed; ErrClosed after Close.
func (s *Subscription) Next(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if len(s.queue) > 0 {
			ev := s.queue[0]
			s.queue = s.queue[1:]
			s.mu.Unlock()
			return ev, nil
		}
		if s.lost {
			s.lost = false
			s.mu.Unlock()
			return Event{}, ErrDisconnected
		}
		if s.err != nil {
			err := s.err
			s.mu.Unlock()
			return Event{}, err
		}
		s.mu.Unlock()
		select {
		case <-s.notify:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// Close ends the subscription.
func (s *Subscription) Close() {
	s.c.subMu.Lock()
	delete(s.c.subs, s)
	s.c.subMu.Unlock()
	s.end(ErrClosed)
}

func (s *Subscription) deliver(ev Event) {
	if s.names != nil && !s.names[ev.Name] {
		return
	}
	s.mu.Lock()
	if s.err == nil {
		if len(s.queue) >= maxQueued {
			s.c.log.Warn("qmp subscription full, dropping oldest event", "event", s.queue[0].Name)
			s.queue = s.queue[1:]
		}
		s.queue = append(s.queue, ev)
	}
	s.mu.Unlock()
	s.wake()
}

func (s *Subscription) disconnected() {
	s.mu.Lock()
	if s.err == nil {
		s.lost = true
	}
	s.mu.Unlock()
	s.wake()
}

func (s *Subscription) end(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.wake()
}

func (s *Subscription) wake() {
	select {
	case s.notify <- struct{}{}:
	default:
	}
}
