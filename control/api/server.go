package api

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/ipvsctl"
	"github.com/kata-dp/kata-dp/control/metrics"
	"github.com/kata-dp/kata-dp/control/monitor"
	"github.com/kata-dp/kata-dp/control/netspec"
	"golang.org/x/sys/unix"
)

// ServerOptions configure a Server.
type ServerOptions struct {
	Version string
	Logger  *slog.Logger     // nil: slog.Default()
	Metrics *metrics.Metrics // nil: operations are not counted
	// IPVS runs the kata-ipvs calls; nil: the agent has no load balancer and they are not
	// served.
	IPVS *ipvsctl.Manager
	// Kata serves sandbox release and adopt (Kata discovery, control/kata); nil: discovery
	// is off and they are not served.
	Kata KataDiscovery
	// Monitor opens sandboxes' event streams for `kata-dp monitor` (GET /v1/monitor); nil:
	// not served.
	Monitor monitor.Source
}

// Server serves the API of one Controller.
type Server struct {
	ctrl    *control.Controller
	opts    ServerOptions
	log     *slog.Logger
	mux     *http.ServeMux
	httpSrv *http.Server
	// streams ends with Shutdown: long-lived responses (the monitor) end with it rather than
	// holding Shutdown up.
	streams     context.Context
	stopStreams context.CancelFunc
}

// NewServer builds the API of ctrl.
func NewServer(ctrl *control.Controller, opts ServerOptions) *Server {
	s := &Server{ctrl: ctrl, opts: opts, log: cmp.Or(opts.Logger, slog.Default()), mux: http.NewServeMux()}
	s.mux.HandleFunc("GET /v1/version", s.version)
	s.mux.HandleFunc("GET /v1/status", s.status)
	s.mux.HandleFunc("GET /v1/sandboxes", s.listSandboxes)
	s.mux.HandleFunc("POST /v1/sandboxes", s.op("sandbox-add", s.addSandbox))
	s.mux.HandleFunc("DELETE /v1/sandboxes/{id}", s.op("sandbox-del", s.delSandbox))
	s.mux.HandleFunc("GET /v1/sandboxes/{id}/health", s.health)
	s.mux.HandleFunc("POST /v1/sandboxes/{id}/kata-network/{op}", s.kataNetwork)
	s.kataRoutes()
	if opts.IPVS != nil {
		s.serveKataIPVS(opts.IPVS)
	}
	if opts.Monitor != nil {
		s.mux.HandleFunc("GET /v1/monitor", s.monitor)
	}
	s.streams, s.stopStreams = context.WithCancel(context.Background())
	s.httpSrv = &http.Server{Handler: s.mux, ReadHeaderTimeout: 10 * time.Second}
	s.httpSrv.RegisterOnShutdown(s.stopStreams)
	return s
}

// Handle adds an endpoint (a net/http ServeMux pattern, e.g. "GET /v1/sandboxes/{id}/x").
// Call it before Serve.
func (s *Server) Handle(pattern string, h http.Handler) { s.mux.Handle(pattern, h) }

// Handler returns the API's handler (for tests over httptest).
func (s *Server) Handler() http.Handler { return s.mux }

// Serve serves the API on l until Shutdown.
func (s *Server) Serve(l net.Listener) error {
	if err := s.httpSrv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve api: %w", err)
	}
	return nil
}

// Shutdown stops accepting calls and waits for running ones.
func (s *Server) Shutdown(ctx context.Context) error { return s.httpSrv.Shutdown(ctx) }

// WriteJSON writes v with status.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

// WriteError writes the error response of err, with what the CLI prints on stdout.
func WriteError(w http.ResponseWriter, err error, stdout []byte) {
	var e *Error
	if !errors.As(err, &e) {
		e = newError(err, stdout)
	}
	WriteJSON(w, e.Status, e)
}

// op wraps a handler of a state-changing call with its metrics.
func (s *Server) op(name string, fn func(w http.ResponseWriter, r *http.Request) error) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		start := time.Now()
		err := fn(w, r)
		s.opts.Metrics.Observe(name, time.Since(start), err)
		if err != nil {
			s.log.Info("api call failed", "op", name, "path", r.URL.Path, "err", err)
		}
	}
}

func (s *Server) version(w http.ResponseWriter, _ *http.Request) {
	WriteJSON(w, 200, VersionResult{Version: s.opts.Version})
}

func (s *Server) status(w http.ResponseWriter, r *http.Request) {
	WriteJSON(w, 200, s.ctrl.Status(r.Context()))
}

func (s *Server) listSandboxes(w http.ResponseWriter, _ *http.Request) {
	WriteJSON(w, 200, s.ctrl.Sandboxes())
}

func (s *Server) addSandbox(w http.ResponseWriter, r *http.Request) error {
	var spec control.SandboxSpec
	dec := json.NewDecoder(io.LimitReader(r.Body, 1<<20))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&spec); err != nil {
		e := errorf(400, CodeDecode, "decode sandbox: %v", err)
		WriteError(w, e, nil)
		return e
	}
	if spec.Source != "" || spec.NoHotplug != "" {
		e := fmt.Errorf("%w: source and noHotplug are set by Kata discovery, not by hand", control.ErrInvalid)
		WriteError(w, e, nil)
		return e
	}
	sb, err := s.ctrl.AddSandbox(r.Context(), spec)
	if err != nil {
		WriteError(w, err, nil)
		return err
	}
	WriteJSON(w, 200, sb)
	return nil
}

func (s *Server) delSandbox(w http.ResponseWriter, r *http.Request) error {
	if err := s.discovered(r.PathValue("id")); err != nil {
		WriteError(w, err, nil)
		return err
	}
	if err := s.ctrl.DelSandbox(r.Context(), r.PathValue("id")); err != nil {
		WriteError(w, err, nil)
		return err
	}
	WriteJSON(w, 200, struct{}{})
	return nil
}

func (s *Server) health(w http.ResponseWriter, r *http.Request) {
	sb, err := s.ctrl.Health(r.Context(), r.PathValue("id"))
	if err != nil {
		WriteError(w, err, netspec.Null)
		return
	}
	WriteJSON(w, 200, sb)
}

func (s *Server) kataNetwork(w http.ResponseWriter, r *http.Request) {
	op := r.PathValue("op")
	start := time.Now()
	input, err := io.ReadAll(io.LimitReader(r.Body, netspec.MaxFileSize+1))
	var stdout []byte
	if err == nil {
		ctx := r.Context()
		if r.URL.Query().Get("exact") == "1" {
			ctx = control.WithExactID(ctx) // the CNI plugin: never a prefix
		}
		stdout, err = KataNetwork(ctx, s.ctrl, r.PathValue("id"), op, input)
	}
	if err == nil || !errors.Is(err, ErrUnknownOp) {
		s.opts.Metrics.Observe(op, time.Since(start), err)
	}
	if err != nil {
		s.log.Info("kata-network failed", "op", op, "sandbox", r.PathValue("id"), "err", err)
		WriteError(w, err, stdout)
		return
	}
	WriteJSON(w, 200, KataNetworkResult{Stdout: string(stdout)})
}

// Listen creates the API socket at path: its directory (0755) when missing, a stale socket of a
// dead agent removed, the socket chmod 0600, and every connection checked to come from root
// (SO_PEERCRED). A socket with a live agent behind it is an error.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("listen %s: exists and is not a socket", path)
		}
		if c, err := net.DialTimeout("unix", path, time.Second); err == nil {
			c.Close()
			return nil, fmt.Errorf("listen %s: another agent is serving it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("listen %s: remove stale socket: %w", path, err)
		}
	}
	// Create the socket under a restrictive umask-equivalent: chmod right after bind, before
	// any accept; peers are checked by credentials anyway.
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	if err := chmodSocket(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("listen %s: chmod: %w", path, err)
	}
	return &rootOnly{Listener: l, allow: func(uid uint32) bool { return uid == 0 }}, nil
}

// chmodSocket changes the mode of the socket at path without following a symlink: whoever
// replaced the socket by a link between bind and chmod must not get the link's target made
// 0600 (or anything else). os.Chmod follows links, and Linux's fchmodat ignores
// AT_SYMLINK_NOFOLLOW; the path is opened O_PATH|O_NOFOLLOW, checked to be a socket, and
// changed through /proc/self/fd, which acts on the opened file itself.
func chmodSocket(path string, mode os.FileMode) error {
	fd, err := unix.Open(path, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &os.PathError{Op: "open", Path: path, Err: err}
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return fmt.Errorf("%s is no longer a socket (mode %o): replaced after bind", path, st.Mode)
	}
	return os.Chmod(fmt.Sprintf("/proc/self/fd/%d", fd), mode)
}

// rootOnly closes connections whose peer is not allowed.
type rootOnly struct {
	net.Listener
	allow func(uid uint32) bool
}

func (l *rootOnly) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		uid, err := peerUID(c)
		if err == nil && l.allow(uid) {
			return c, nil
		}
		slog.Warn("api: refused connection", "uid", uid, "err", err)
		c.Close()
	}
}

func peerUID(c net.Conn) (uint32, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return 0, errors.New("not a unix connection")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var cerr error
	if err := raw.Control(func(fd uintptr) {
		cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if cerr != nil {
		return 0, fmt.Errorf("SO_PEERCRED: %w", cerr)
	}
	return cred.Uid, nil
}
