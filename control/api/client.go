package api

import (
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
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/netspec"
)

// DefaultTimeout bounds a call of a Client made by NewClient whose context has no deadline.
//
// The agent answers in well under a second normally (a kata-ipvs restore of 20000 rules takes
// about 0.1 s, see docs/performance.md; a hot-plug into a TCG guest a few QMP commands of
// milliseconds each, and an unplug waits at most vmplug's 5 s for the guest). Its slowest
// bounded failure is a hung QEMU: each QMP command gives up after qmp.DefaultTimeout (15 s),
// so an add-iface fails within about 15 s + its rollback, a del-iface within about 35 s.
// Two minutes is well past those, so the client reports the agent's own error rather than its
// timeout, and still ends when the agent itself is wedged.
const DefaultTimeout = 2 * time.Minute

// Client calls the agent's API over its unix socket.
type Client struct {
	// Timeout bounds each call whose context has no deadline (a context deadline, earlier
	// or later, takes precedence); zero means no bound. NewClient sets DefaultTimeout.
	Timeout time.Duration

	path string
	hc   *http.Client
}

// SocketPath returns the socket clients use: flag (when set), else $KATA_DP_SOCKET, else
// DefaultSocket.
func SocketPath(flag string) string {
	if flag != "" {
		return flag
	}
	if env := os.Getenv(SocketEnv); env != "" {
		return env
	}
	return DefaultSocket
}

// NewClient returns a client of the agent listening on path.
func NewClient(path string) *Client {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
		DisableCompression: true,
		// Only requests that ask for it (a restore's rules) wait for 100 Continue; the agent
		// sends it as soon as its handler starts reading. Past this the body is sent anyway.
		ExpectContinueTimeout: 5 * time.Second,
	}
	return &Client{Timeout: DefaultTimeout, path: path, hc: &http.Client{Transport: tr}}
}

// Do calls method on the API path (e.g. "/v1/status") with in as body (nil: none; []byte: raw;
// anything else: JSON) and decodes a success response into out (nil: ignored). A failure
// response is returned as *Error.
func (c *Client) Do(ctx context.Context, method, path string, in, out any) error {
	return c.bounded(ctx, method, path, func(ctx context.Context) error { return c.do(ctx, method, path, in, out) })
}

// bounded runs call, the call of method path, within c.Timeout when ctx has no deadline.
func (c *Client) bounded(ctx context.Context, method, path string, call func(context.Context) error) error {
	if _, ok := ctx.Deadline(); !ok && c.Timeout > 0 {
		parent := ctx
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, c.Timeout)
		defer cancel()
		err := call(ctx)
		if errors.Is(err, context.DeadlineExceeded) && parent.Err() == nil {
			return fmt.Errorf("%s %s: no answer from the agent at %s within %v: %w", method, path, c.path, c.Timeout, context.DeadlineExceeded)
		}
		return err
	}
	return call(ctx)
}

// Path returns the socket the client calls.
func (c *Client) Path() string { return c.path }

func (c *Client) do(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	var rules *rulesReader
	switch v := in.(type) {
	case nil:
	case []byte:
		body = bytes.NewReader(v)
	case *rulesReader:
		body, rules = v, v
	default:
		b, err := json.Marshal(v)
		if err != nil {
			return fmt.Errorf("%s %s: encode: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://kata-dp"+path, body)
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, path, err)
	}
	if rules != nil {
		// Sent as read: with its length when known, else chunked. The body waits for the
		// agent's 100 Continue, so an agent that answers first (404: an older one) gets none
		// of it and the caller can still send the rules another way.
		req.ContentLength = rules.size
		req.Header.Set("Content-Type", "text/plain")
		req.Header.Set("Expect", "100-continue")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		return fmt.Errorf("%w at %s: %v", ErrUnreachable, c.path, unwrapURL(err))
	}
	return answer(method, path, resp, out)
}

// answer reads the agent's answer to method path and decodes a success into out (nil:
// ignored); a failure is returned as *Error (or *answerError without the API's error body).
func answer(method, path string, resp *http.Response, out any) error {
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("%s %s: read response: %w", method, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		e := &Error{Status: resp.StatusCode}
		if err := json.Unmarshal(b, e); err != nil || e.Message == "" {
			return &answerError{fmt.Sprintf("%s %s: agent answered %s", method, path, resp.Status), resp.StatusCode}
		}
		return e
	}
	if out == nil {
		return nil
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: decode response: %w", method, path, err)
	}
	return nil
}

// answerError is a failure answered without the API's error body: from the HTTP server
// itself, e.g. 404 for a call this agent does not have (an older version).
type answerError struct {
	msg    string
	status int
}

func (e *answerError) Error() string { return e.msg }

func unwrapURL(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// Version returns the agent's version.
func (c *Client) Version(ctx context.Context) (string, error) {
	var v VersionResult
	err := c.Do(ctx, "GET", "/v1/version", nil, &v)
	return v.Version, err
}

// Status returns the agent's status report.
func (c *Client) Status(ctx context.Context) ([]control.SandboxStatus, error) {
	var st []control.SandboxStatus
	err := c.Do(ctx, "GET", "/v1/status", nil, &st)
	return st, err
}

// Sandboxes lists the registered sandboxes.
func (c *Client) Sandboxes(ctx context.Context) ([]control.Sandbox, error) {
	var sbs []control.Sandbox
	err := c.Do(ctx, "GET", "/v1/sandboxes", nil, &sbs)
	return sbs, err
}

// AddSandbox registers a sandbox.
func (c *Client) AddSandbox(ctx context.Context, spec control.SandboxSpec) (control.Sandbox, error) {
	var sb control.Sandbox
	err := c.Do(ctx, "POST", "/v1/sandboxes", spec, &sb)
	return sb, err
}

// DelSandbox removes a sandbox (exact id, never a prefix) and everything kata-dp created for it.
func (c *Client) DelSandbox(ctx context.Context, id string) error {
	return c.Do(ctx, "DELETE", "/v1/sandboxes/"+url.PathEscape(id), nil, nil)
}

// Health resolves a sandbox id prefix and checks the sandbox's health.
func (c *Client) Health(ctx context.Context, id string) (control.Sandbox, error) {
	var sb control.Sandbox
	err := c.Do(ctx, "GET", "/v1/sandboxes/"+url.PathEscape(id)+"/health", nil, &sb)
	return sb, err
}

// KataNetwork runs a kata-network operation with the raw network file input and returns what
// the CLI prints on stdout, on failure too (then err is an *Error, or wraps ErrUnreachable and
// stdout is "null": the sandbox could not be checked).
func (c *Client) KataNetwork(ctx context.Context, id, op string, input []byte) ([]byte, error) {
	return c.kataNetwork(ctx, id, op, "", input)
}

// kataNetwork posts one kata-network operation; query ("" or "?exact=1") chooses how id is
// matched.
func (c *Client) kataNetwork(ctx context.Context, id, op, query string, input []byte) ([]byte, error) {
	if input == nil {
		input = []byte{}
	}
	var res KataNetworkResult
	err := c.Do(ctx, "POST", "/v1/sandboxes/"+url.PathEscape(id)+"/kata-network/"+url.PathEscape(op)+query, input, &res)
	if err != nil {
		var e *Error
		if errors.As(err, &e) {
			return []byte(e.Stdout), err
		}
		if errors.Is(err, ErrUnreachable) {
			return netspec.Null, err
		}
		return nil, err
	}
	return []byte(res.Stdout), nil
}

// KataNetworkUnread reports a network file the CLI could not read (readErr) the way Kata does:
// the sandbox is checked first, so a missing or unhealthy one prints null and fails with that
// error; otherwise nothing is printed and readErr is the error.
func (c *Client) KataNetworkUnread(ctx context.Context, id string, readErr error) ([]byte, error) {
	if _, err := c.Health(ctx, id); err != nil {
		return netspec.Null, err
	}
	return nil, readErr
}
