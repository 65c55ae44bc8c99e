package api

import (
	"context"
	"fmt"
	"net/http"
	"net/url"

	"github.com/kata-dp/kata-dp/control"
)

// KataDiscovery is the agent's Kata discovery task (control/kata.Discovery) as the API sees
// it: the routes below hand a discovered sandbox back to Kata's own plumbing and take it
// over again.
type KataDiscovery interface {
	Release(ctx context.Context, id string) error
	Adopt(ctx context.Context, id string) error
	Released() []string
}

// KataResult is the answer of release and adopt.
type KataResult struct {
	ID string `json:"id"`
	// Released lists the sandboxes released and not adopted since.
	Released []string `json:"released"`
}

func (s *Server) kataRoutes() {
	if s.opts.Kata == nil {
		return
	}
	s.mux.HandleFunc("POST /v1/sandboxes/{id}/release", s.op("sandbox-release", s.kataCall(s.opts.Kata.Release)))
	s.mux.HandleFunc("POST /v1/sandboxes/{id}/adopt", s.op("sandbox-adopt", s.kataCall(s.opts.Kata.Adopt)))
}

func (s *Server) kataCall(fn func(context.Context, string) error) func(http.ResponseWriter, *http.Request) error {
	return func(w http.ResponseWriter, r *http.Request) error {
		id := r.PathValue("id")
		if err := fn(r.Context(), id); err != nil {
			WriteError(w, err, nil)
			return err
		}
		WriteJSON(w, 200, KataResult{ID: id, Released: s.opts.Kata.Released()})
		return nil
	}
}

// discovered refuses `sandbox del` of a sandbox that Kata discovery registered: Kata's own
// removal of the sandbox removes it, and release hands it back to Kata's plumbing.
func (s *Server) discovered(id string) error {
	for _, sb := range s.ctrl.Sandboxes() {
		if sb.ID == id && sb.Source == control.SourceDiscovery {
			return fmt.Errorf("%w: sandbox %s is managed by Kata discovery: `kata-dp sandbox release %s` hands it back to Kata's tcfilter plumbing, and it goes when Kata removes it", control.ErrInvalid, id, id)
		}
	}
	return nil
}

// ReleaseSandbox hands a discovered sandbox (exact id) back to Kata's tcfilter plumbing.
func (c *Client) ReleaseSandbox(ctx context.Context, id string) (KataResult, error) {
	var res KataResult
	err := c.Do(ctx, "POST", "/v1/sandboxes/"+url.PathEscape(id)+"/release", nil, &res)
	return res, err
}

// AdoptSandbox lets Kata discovery take a released sandbox (exact id) over again.
func (c *Client) AdoptSandbox(ctx context.Context, id string) (KataResult, error) {
	var res KataResult
	err := c.Do(ctx, "POST", "/v1/sandboxes/"+url.PathEscape(id)+"/adopt", nil, &res)
	return res, err
}
