package api

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/kata-dp/kata-dp/control/ipvsctl"
)

// The kata-ipvs operations (spec/kata-ipvs.md): `ipvsadm --parameters`, `ipvsadm --restore -`
// and `cleanup --parameters`.
const (
	IPVSOpIpvsadm = "ipvsadm"
	IPVSOpRestore = "restore"
	IPVSOpCleanup = "cleanup"
)

// MaxRestoreSize bounds a kata-ipvs restore file: 20000 rules of at most ~100 bytes each,
// with room.
const MaxRestoreSize = 8 << 20

// IPVSRequest is the body of the kata-ipvs calls: Parameters for ipvsadm and cleanup, Rules
// (ipvsadm-save lines) for restore.
type IPVSRequest struct {
	Parameters string `json:"parameters,omitempty"`
	Rules      string `json:"rules,omitempty"`
}

// IPVSResult is the success response of a kata-ipvs call: what the CLI prints on stdout (a
// listing, or nothing for a change).
type IPVSResult struct {
	Stdout string `json:"stdout"`
}

// serveKataIPVS adds the kata-ipvs calls, run by m:
//
//	POST /v1/sandboxes/{id}/kata-ipvs/{ipvsadm,restore,cleanup}  IPVSRequest -> IPVSResult
//	POST /v1/sandboxes/{id}/kata-ipvs/restore-rules              rules file -> IPVSResult
func (s *Server) serveKataIPVS(m *ipvsctl.Manager) {
	handle := func(op string, fn func(r *http.Request, req IPVSRequest) (string, error)) {
		s.mux.HandleFunc("POST /v1/sandboxes/{id}/kata-ipvs/"+op, func(w http.ResponseWriter, r *http.Request) {
			start := time.Now()
			var req IPVSRequest
			err := json.NewDecoder(io.LimitReader(r.Body, MaxRestoreSize+1<<10)).Decode(&req)
			var out string
			if err == nil {
				out, err = fn(r, req)
			} else {
				err = fmt.Errorf("kata-ipvs: bad request: %w", err)
			}
			s.opts.Metrics.Observe("kata-ipvs-"+op, time.Since(start), err)
			if err != nil {
				WriteError(w, err, nil)
				return
			}
			WriteJSON(w, http.StatusOK, IPVSResult{Stdout: out})
		})
	}
	handle(IPVSOpIpvsadm, func(r *http.Request, req IPVSRequest) (string, error) {
		return m.Ipvsadm(r.Context(), r.PathValue("id"), req.Parameters)
	})
	handle(IPVSOpRestore, func(r *http.Request, req IPVSRequest) (string, error) {
		return "", m.Restore(r.Context(), r.PathValue("id"), strings.NewReader(req.Rules))
	})
	handle(IPVSOpCleanup, func(r *http.Request, req IPVSRequest) (string, error) {
		return m.Cleanup(r.Context(), r.PathValue("id"), req.Parameters)
	})
	// The rules file as it is, streamed into the parser: the JSON string of the call above
	// costs about 3 ms to encode in the CLI and 9 ms to decode here at 20000 rules, plus the
	// copies, in a restore whose goal is 50 ms from the CLI's start.
	s.mux.HandleFunc("POST /v1/sandboxes/{id}/kata-ipvs/"+ipvsRestoreRules, func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		body := sizedReader{http.MaxBytesReader(w, r.Body, MaxRestoreSize), int(min(max(r.ContentLength, 0), MaxRestoreSize))}
		err := m.Restore(r.Context(), r.PathValue("id"), body)
		s.opts.Metrics.Observe("kata-ipvs-"+IPVSOpRestore, time.Since(start), err)
		if err != nil {
			WriteError(w, err, nil)
			return
		}
		WriteJSON(w, http.StatusOK, IPVSResult{})
	})
}

// ipvsRestoreRules is the kata-ipvs call that takes a restore's rules file as its raw body
// (text/plain) instead of IPVSRequest's JSON string.
const ipvsRestoreRules = "restore-rules"

// sizedReader tells the size of what it reads (the request's Content-Length) with Len, so the
// parser reads it into one buffer of the right size.
type sizedReader struct {
	io.Reader
	n int
}

func (r sizedReader) Len() int { return r.n }

// KataIPVSRestore runs `kata-ipvs ipvsadm --restore -` of rules (ipvsadm-save lines) on the
// sandbox id, sending the rules as they are. An agent older than that call gets them in
// IPVSRequest (IPVSOpRestore), as before.
func (c *Client) KataIPVSRestore(ctx context.Context, id string, rules []byte) error {
	err := c.Do(ctx, http.MethodPost, "/v1/sandboxes/"+url.PathEscape(id)+"/kata-ipvs/"+ipvsRestoreRules, rules, nil)
	if ae := (*answerError)(nil); errors.As(err, &ae) && ae.status == http.StatusNotFound {
		_, err = c.KataIPVS(ctx, id, IPVSOpRestore, IPVSRequest{Rules: string(rules)})
	}
	return err
}

// KataIPVS runs a kata-ipvs operation (IPVSOpIpvsadm, IPVSOpRestore or IPVSOpCleanup) on the
// sandbox id (exact or unique prefix) and returns what the CLI prints on stdout.
func (c *Client) KataIPVS(ctx context.Context, id, op string, req IPVSRequest) (string, error) {
	var res IPVSResult
	if err := c.Do(ctx, http.MethodPost, "/v1/sandboxes/"+url.PathEscape(id)+"/kata-ipvs/"+url.PathEscape(op), req, &res); err != nil {
		return "", err
	}
	return res.Stdout, nil
}
