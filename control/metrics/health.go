package metrics

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"time"
)

// Health answers /healthz (the agent runs) and /readyz (every readiness check passes).
type Health struct {
	mu     sync.Mutex
	checks []check
}

type check struct {
	name string
	fn   func(ctx context.Context) error
}

// CheckResult is one readiness check's outcome; Err is "" when it passed.
type CheckResult struct {
	Name string `json:"name"`
	Err  string `json:"error,omitempty"`
}

// Add adds a named readiness check; fn returns nil when its part of the agent is ready. A
// name already in use replaces that check. Checks run on every /readyz, so they must be cheap.
func (h *Health) Add(name string, fn func(ctx context.Context) error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	for i := range h.checks {
		if h.checks[i].name == name {
			h.checks[i].fn = fn
			return
		}
	}
	h.checks = append(h.checks, check{name, fn})
}

// Gate adds a check that fails with "not yet: <what>" until the returned function is called
// (once a start-up step is done).
func (h *Health) Gate(name, what string) (done func()) {
	var mu sync.Mutex
	ok := false
	h.Add(name, func(context.Context) error {
		mu.Lock()
		defer mu.Unlock()
		if !ok {
			return errors.New("not yet: " + what)
		}
		return nil
	})
	return func() {
		mu.Lock()
		ok = true
		mu.Unlock()
	}
}

// Ready runs every check, in the order they were added; ready is true when all passed.
func (h *Health) Ready(ctx context.Context) (ready bool, results []CheckResult) {
	h.mu.Lock()
	checks := append([]check(nil), h.checks...)
	h.mu.Unlock()
	ready = true
	for _, c := range checks {
		r := CheckResult{Name: c.name}
		if err := c.fn(ctx); err != nil {
			r.Err = err.Error()
			ready = false
		}
		results = append(results, r)
	}
	return ready, results
}

// readyTimeout bounds one /readyz.
const readyTimeout = 5 * time.Second

// ServeReady serves /readyz: 200 and "ok" when ready, else 503 with one line per check
// ("[+]name ok" or "[-]name failed: why", the form Kubernetes components use); ?verbose lists
// every check when ready too.
func (h *Health) ServeReady(w http.ResponseWriter, r *http.Request) {
	ctx, cancel := context.WithTimeout(r.Context(), readyTimeout)
	defer cancel()
	ready, results := h.Ready(ctx)
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if !ready {
		w.WriteHeader(http.StatusServiceUnavailable)
	}
	_, verbose := r.URL.Query()["verbose"]
	if ready && !verbose {
		fmt.Fprintln(w, "ok")
		return
	}
	var b strings.Builder
	for _, c := range results {
		if c.Err == "" {
			fmt.Fprintf(&b, "[+]%s ok\n", c.Name)
		} else {
			fmt.Fprintf(&b, "[-]%s failed: %s\n", c.Name, c.Err)
		}
	}
	if ready {
		b.WriteString("ok\n")
	} else {
		b.WriteString("not ready\n")
	}
	w.Write([]byte(b.String()))
}

// ServeHealthy serves /healthz: the agent's process answers HTTP. It does not look at the
// sandboxes (an unhealthy sandbox is reported by the metrics, not by restarting the agent).
func ServeHealthy(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	fmt.Fprintln(w, "ok")
}
