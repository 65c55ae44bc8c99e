package api

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"github.com/kata-dp/kata-dp/control/monitor"
	"github.com/kata-dp/kata-dp/maps"
)

// monitor serves GET /v1/monitor?sandbox=&nic=&type=drop,trace,lb&reason=: the filter is
// checked first (400, 404 as JSON errors, like every call); then the events stream as JSON
// lines (application/x-ndjson) until the client leaves or the agent stops. An error after the
// stream started is a last line {"type":"error","error":"..."}.
func (s *Server) monitor(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	f := monitor.Filter{Sandbox: q.Get("sandbox"), NIC: q.Get("nic"), Types: list(q["type"]), Reasons: list(q["reason"])}
	if err := monitor.Check(s.ctrl, f); err != nil {
		WriteError(w, err, nil)
		return
	}
	fl, ok := w.(http.Flusher)
	if !ok {
		WriteError(w, errors.New("monitor: the connection cannot stream"), nil)
		return
	}
	// The stream ends with the agent: Shutdown cancels it instead of waiting for it.
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	stop := context.AfterFunc(s.streams, cancel)
	defer stop()
	w.Header().Set("Content-Type", "application/x-ndjson")
	w.WriteHeader(http.StatusOK)
	fl.Flush()
	enc := json.NewEncoder(w)
	s.log.Info("monitor session started", "sandbox", f.Sandbox, "nic", f.NIC, "types", f.Types, "reasons", f.Reasons)
	err := monitor.Run(ctx, s.ctrl, s.opts.Monitor, f, func(e monitor.Event) error {
		if err := enc.Encode(e); err != nil {
			return fmt.Errorf("client gone: %w", err)
		}
		fl.Flush()
		return nil
	})
	switch {
	case err == nil || r.Context().Err() != nil:
		s.log.Info("monitor session ended", "sandbox", f.Sandbox)
	case strings.HasPrefix(err.Error(), "client gone"):
		s.log.Info("monitor client left", "sandbox", f.Sandbox, "err", err)
	default:
		s.log.Info("monitor session failed", "sandbox", f.Sandbox, "err", err)
		enc.Encode(monitorError{Type: "error", Error: err.Error()})
		fl.Flush()
	}
}

type monitorError struct {
	Type  string `json:"type"`
	Error string `json:"error"`
}

// list splits repeated and comma-separated query values.
func list(vs []string) []string {
	var out []string
	for _, v := range vs {
		for _, p := range strings.Split(v, ",") {
			if p = strings.TrimSpace(p); p != "" {
				out = append(out, p)
			}
		}
	}
	return out
}

// Monitor streams the agent's monitor events matching f to fn until ctx ends (nil), fn fails
// (its error), or the agent ends the stream (its error). It has no timeout: it runs until
// stopped.
func (c *Client) Monitor(ctx context.Context, f monitor.Filter, fn func(monitor.Event) error) error {
	q := url.Values{}
	if f.Sandbox != "" {
		q.Set("sandbox", f.Sandbox)
	}
	if f.NIC != "" {
		q.Set("nic", f.NIC)
	}
	if len(f.Types) > 0 {
		q.Set("type", strings.Join(f.Types, ","))
	}
	if len(f.Reasons) > 0 {
		q.Set("reason", strings.Join(f.Reasons, ","))
	}
	req, err := http.NewRequestWithContext(ctx, "GET", "http://kata-dp/v1/monitor?"+q.Encode(), nil)
	if err != nil {
		return fmt.Errorf("monitor: %w", err)
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.path, unwrapURL(err))
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		e := &Error{Status: resp.StatusCode}
		if err := json.NewDecoder(resp.Body).Decode(e); err != nil || e.Message == "" {
			return fmt.Errorf("monitor: agent answered %s", resp.Status)
		}
		return e
	}
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		var e struct {
			monitor.Event
			Error string `json:"error"`
		}
		if err := json.Unmarshal(sc.Bytes(), &e); err != nil {
			return fmt.Errorf("monitor: decode event: %w", err)
		}
		if e.Type == "error" {
			return fmt.Errorf("monitor: %s", e.Error)
		}
		if err := fn(e.Event); err != nil {
			return err
		}
	}
	if ctx.Err() != nil {
		return nil
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("monitor: %w", err)
	}
	return errors.New("monitor: the agent ended the stream")
}

// MonitorSource adapts a dataplane's Monitor (control/dataplane) to monitor.Source.
type MonitorSource[S monitor.Stream] func(ctx context.Context, id string, flags maps.MonitorFlags) (S, error)

// Monitor implements monitor.Source.
func (f MonitorSource[S]) Monitor(ctx context.Context, id string, flags maps.MonitorFlags) (monitor.Stream, error) {
	s, err := f(ctx, id, flags)
	if err != nil {
		return nil, err
	}
	return s, nil
}
