package metrics

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"time"
)

// ErrRemote is returned by CheckAddr for an address that is not loopback when remote
// listening was not allowed.
var ErrRemote = errors.New("not a loopback address: /metrics, /healthz and /readyz are served without authentication (allow it with --metrics-allow-remote)")

// CheckAddr checks a HOST:PORT for the metrics listener: the host must be a loopback address
// or "localhost" unless allowRemote; an empty host (every address) is not loopback.
func CheckAddr(addr string, allowRemote bool) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return err
	}
	if allowRemote || host == "localhost" {
		return nil
	}
	if a, err := netip.ParseAddr(host); err == nil && a.IsLoopback() {
		return nil
	}
	return fmt.Errorf("%q: %w", host, ErrRemote)
}

// Listen opens the metrics listener on addr, checked with CheckAddr.
func Listen(addr string, allowRemote bool) (net.Listener, error) {
	if err := CheckAddr(addr, allowRemote); err != nil {
		return nil, fmt.Errorf("metrics listener %s: %w", addr, err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listener: %w", err)
	}
	return l, nil
}

// NewServer returns the metrics listener's server: GET /metrics, /healthz and /readyz.
func NewServer(m *Metrics, h *Health) *http.Server {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", m.Handler())
	mux.HandleFunc("GET /healthz", ServeHealthy)
	mux.HandleFunc("GET /readyz", h.ServeReady)
	return &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
}
