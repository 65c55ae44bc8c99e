package api

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/internal/headstart"
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
		// The parser reads the rules into one buffer of this size: the file's, or, for rules
		// streamed from a pipe (chunked, no length), room for the usual 20000 rules (about
		// 0.9 MiB) so that it is not grown and copied from 512 bytes.
		n := int(min(r.ContentLength, MaxRestoreSize))
		if r.ContentLength < 0 {
			n = streamedRulesHint
		}
		body := sizedReader{http.MaxBytesReader(w, r.Body, MaxRestoreSize), n}
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

// streamedRulesHint is the buffer the agent reads a restore of unknown length into (see
// serveKataIPVS).
const streamedRulesHint = 1 << 20

// KataIPVSRestore runs `kata-ipvs ipvsadm --restore -` of the rules (ipvsadm-save lines) read
// from rules on the sandbox id. The rules are sent as they are read, never held whole in this
// process: a regular file with its length, anything else (a pipe) chunked. Reading 20000 rules
// (0.9 MB) into one buffer first, then sending it, took the CLI 5-6 ms of page faults and
// copies before the agent saw the first byte.
//
// An agent older than that call (during an upgrade) answers 404 before it reads the body (the
// request asks for 100-continue); the rules are then read whole and sent in IPVSRequest
// (IPVSOpRestore), as before.
func (c *Client) KataIPVSRestore(ctx context.Context, id string, rules io.Reader) error {
	body := &rulesReader{r: rules, size: -1}
	if f, ok := rules.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode().IsRegular() {
			if off, err := f.Seek(0, io.SeekCurrent); err == nil && fi.Size() >= off {
				body.size = fi.Size() - off
			}
		}
	}
	if body.size > MaxRestoreSize {
		return errRulesTooBig
	}
	err := c.Do(ctx, http.MethodPost, "/v1/sandboxes/"+url.PathEscape(id)+"/kata-ipvs/"+ipvsRestoreRules, body, nil)
	n, rerr := body.state()
	if rerr != nil {
		// The rules could not be read (or were too many): that, not how the request ended.
		return rerr
	}
	return c.olderAgent(ctx, id, rules, n == 0, err)
}

// olderAgent handles the answer err to a restore-rules call: an agent without that call (an
// older one) answers 404, and when it did so before any rule was read (unread) the rules are
// read whole and sent in IPVSRequest (IPVSOpRestore), as before that call.
func (c *Client) olderAgent(ctx context.Context, id string, rules io.Reader, unread bool, err error) error {
	if ae := (*answerError)(nil); errors.As(err, &ae) && ae.status == http.StatusNotFound {
		if !unread {
			return fmt.Errorf("kata-ipvs: the agent has no restore-rules call and did not wait for the rules: %w", err)
		}
		b, rerr := readAllRules(rules)
		if rerr != nil {
			return rerr
		}
		_, err = c.KataIPVS(ctx, id, IPVSOpRestore, IPVSRequest{Rules: string(b)})
	}
	return err
}

// FinishRestore ends the restore that internal/headstart started at this process's start,
// u, with rules its standard input: it waits for the upload and reads the agent's answer
// from the upload's connection, and returns what KataIPVSRestore(ctx, u.ID, rules) would
// have. An upload that read nothing (Declined: no agent, or it went away before asking for
// the rules) leaves the restore to KataIPVSRestore; an older agent's 404 to the JSON call.
// The restore's time from the command line is the reason (package headstart): the agent
// works on the rules while this process initialises its packages.
func (c *Client) FinishRestore(ctx context.Context, u *headstart.Upload, rules io.Reader) error {
	path := "/v1/sandboxes/" + url.PathEscape(u.ID) + "/kata-ipvs/" + ipvsRestoreRules
	err := c.bounded(ctx, http.MethodPost, path, func(ctx context.Context) error {
		select {
		case <-u.Done():
		case <-ctx.Done():
			u.Abort()
			return ctx.Err()
		}
		if u.Declined {
			return errDeclined
		}
		f := os.NewFile(uintptr(u.Fd()), "kata-dp agent")
		defer f.Close()
		switch {
		case errors.Is(u.ReadErr, headstart.ErrTooBig):
			return errRulesTooBig
		case u.ReadErr != nil:
			return fmt.Errorf("kata-ipvs: read rules: %w", u.ReadErr)
		}
		conn, err := net.FileConn(f)
		if err != nil {
			return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.path, err)
		}
		defer conn.Close()
		stop := context.AfterFunc(ctx, func() { conn.SetDeadline(time.Unix(1, 0)) })
		defer stop()
		resp, err := http.ReadResponse(bufio.NewReader(io.MultiReader(bytes.NewReader(u.Head), conn)), nil)
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if u.SendErr != nil {
				err = u.SendErr
			}
			return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.path, err)
		}
		err = answer(http.MethodPost, path, resp, nil)
		if err != nil && ctx.Err() != nil {
			return ctx.Err()
		}
		return err
	})
	if errors.Is(err, errDeclined) {
		return c.KataIPVSRestore(ctx, u.ID, rules)
	}
	return c.olderAgent(ctx, u.ID, rules, u.Early, err)
}

// errDeclined: the upload read no rules and left the restore to KataIPVSRestore.
var errDeclined = errors.New("kata-ipvs: restore not started")

var errRulesTooBig = fmt.Errorf("kata-ipvs: rules file too big (more than %d bytes)", MaxRestoreSize)

// rulesReader is a restore's body as the client sends it: it counts what it read and keeps
// the first read error (or errRulesTooBig past MaxRestoreSize), which KataIPVSRestore reports
// instead of the aborted request's error. The transport reads it in a goroutine of its own,
// which may still run when an early answer (an error) has ended the call: hence the lock.
type rulesReader struct {
	r    io.Reader
	size int64 // the length, -1 when unknown (sent chunked)

	mu  sync.Mutex
	n   int64
	err error
}

func (b *rulesReader) Read(p []byte) (int, error) {
	// Only the transport's goroutine reads; the lock guards the fields, never the read (a
	// caller whose call ended must not wait for standard input).
	if _, err := b.state(); err != nil {
		return 0, err
	}
	n, err := b.r.Read(p)
	b.mu.Lock()
	defer b.mu.Unlock()
	b.n += int64(n)
	switch {
	case b.n > MaxRestoreSize:
		b.err = errRulesTooBig
		return n, b.err
	case err != nil && err != io.EOF:
		b.err = fmt.Errorf("kata-ipvs: read rules: %w", err)
		return n, b.err
	}
	return n, err
}

// state returns how much was read and the reading's error.
func (b *rulesReader) state() (int64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.n, b.err
}

// readAllRules reads the rules whole (for an agent without the restore-rules call).
func readAllRules(r io.Reader) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(r, MaxRestoreSize+1))
	if err != nil {
		return nil, fmt.Errorf("kata-ipvs: read rules: %w", err)
	}
	if len(b) > MaxRestoreSize {
		return nil, errRulesTooBig
	}
	return b, nil
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
