// Package kubetest runs a real Kubernetes API server for tests: Debian's etcd and the
// kube-apiserver that hack/kube-apiserver.sh builds once into a cache directory, both on
// loopback with throwaway certificates, so the Kubernetes integration is tested against the
// component it talks to in production instead of a fake clientset.
//
// Both processes live in the test's temporary directory and are stopped by t.Cleanup, the API
// server before etcd (the other way round the API server hangs on SIGTERM).
package kubetest

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/internal/proctest"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// Version is the Kubernetes release hack/kube-apiserver.sh builds.
const Version = "v1.37.2"

// Binary returns the kube-apiserver to run: $KDP_KUBE_APISERVER, else the cache path that
// hack/kube-apiserver.sh writes ($KDP_KUBE_CACHE or /var/cache/kata-dp/kube, then the version).
func Binary() string {
	if p := os.Getenv("KDP_KUBE_APISERVER"); p != "" {
		return p
	}
	cache := os.Getenv("KDP_KUBE_CACHE")
	if cache == "" {
		cache = "/var/cache/kata-dp/kube"
	}
	return filepath.Join(cache, Version, "kube-apiserver")
}

// Cluster is a running etcd and API server. Config and Client authenticate as a member of
// system:masters; Kubeconfig is a file with the same credentials (for code that takes a path,
// as `kata-dp agent --kubeconfig` does).
type Cluster struct {
	Config     *rest.Config
	Client     kubernetes.Interface
	Kubeconfig string
	// Token authenticates as the admin user (the API server's token file).
	Token string

	t       testing.TB
	dir     string
	apiPort int
	etcdURL string

	mu     sync.Mutex
	etcd   *process
	apisrv *process
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	log  *bytes.Buffer
}

// Start runs etcd and the API server and waits until /readyz answers. It skips the test when
// the API server has not been built (run `make kube`) or etcd is not installed (apt-get install
// etcd-server); `make test` builds the API server first, so CI never skips.
func Start(t testing.TB) *Cluster {
	t.Helper()
	if _, err := os.Stat(Binary()); err != nil {
		t.Skipf("kube-apiserver not built (%v): run `make kube` (hack/kube-apiserver.sh)", err)
	}
	etcdBin, err := exec.LookPath("etcd")
	if err != nil {
		t.Skip("etcd not installed (apt-get install --no-install-recommends etcd-server)")
	}
	dir := t.TempDir()
	c := &Cluster{t: t, dir: dir}
	t.Cleanup(c.stop)

	ports := freePorts(t, 3)
	c.etcdURL = "http://127.0.0.1:" + strconv.Itoa(ports[0])
	peerURL := "http://127.0.0.1:" + strconv.Itoa(ports[1])
	c.apiPort = ports[2]
	c.etcd = c.run(etcdBin,
		"--name=kdpt",
		"--data-dir="+filepath.Join(dir, "etcd"),
		"--listen-client-urls="+c.etcdURL,
		"--advertise-client-urls="+c.etcdURL,
		"--listen-peer-urls="+peerURL,
		"--initial-advertise-peer-urls="+peerURL,
		"--initial-cluster=kdpt="+peerURL,
		"--log-level=warn",
	)
	if err := waitHTTP(c.etcdURL+"/health", nil, 30*time.Second, c.etcd); err != nil {
		t.Fatalf("kubetest: etcd did not start: %v\n%s", err, c.etcd.log)
	}

	ca, caKey := newCA(t)
	writePEM(t, filepath.Join(dir, "ca.crt"), "CERTIFICATE", ca.Raw)
	srvCert, srvKey := newServerCert(t, ca, caKey)
	writePEM(t, filepath.Join(dir, "server.crt"), "CERTIFICATE", srvCert)
	writeKey(t, filepath.Join(dir, "server.key"), srvKey)
	saKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	writeKey(t, filepath.Join(dir, "sa.key"), saKey)
	c.Token = randomToken(t)
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"),
		[]byte(c.Token+`,kdpt-admin,kdpt-admin,"system:masters"`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	c.Config = &rest.Config{
		Host:            "https://127.0.0.1:" + strconv.Itoa(c.apiPort),
		BearerToken:     c.Token,
		TLSClientConfig: rest.TLSClientConfig{CAFile: filepath.Join(dir, "ca.crt")},
		QPS:             1000,
		Burst:           2000,
	}
	c.Kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(c.Kubeconfig, []byte(fmt.Sprintf(kubeconfigTmpl,
		filepath.Join(dir, "ca.crt"), c.Config.Host, c.Token)), 0o600); err != nil {
		t.Fatal(err)
	}
	c.StartAPIServer()
	c.Client, err = kubernetes.NewForConfig(c.Config)
	if err != nil {
		t.Fatalf("kubetest: client: %v", err)
	}
	return c
}

const kubeconfigTmpl = `apiVersion: v1
kind: Config
clusters:
- name: kdpt
  cluster:
    certificate-authority: %s
    server: %s
users:
- name: kdpt-admin
  user:
    token: %s
contexts:
- name: kdpt
  context:
    cluster: kdpt
    user: kdpt-admin
current-context: kdpt
`

// StartAPIServer (re)starts the API server on the same port with the same etcd and
// credentials, and waits until it is ready. Start calls it; tests call it after StopAPIServer.
func (c *Cluster) StartAPIServer() {
	c.t.Helper()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.apisrv != nil {
		c.t.Fatal("kubetest: API server already running")
	}
	d := c.dir
	c.apisrv = c.run(Binary(),
		"--etcd-servers="+c.etcdURL,
		"--bind-address=127.0.0.1",
		"--advertise-address=127.0.0.1",
		"--secure-port="+strconv.Itoa(c.apiPort),
		"--tls-cert-file="+filepath.Join(d, "server.crt"),
		"--tls-private-key-file="+filepath.Join(d, "server.key"),
		"--client-ca-file="+filepath.Join(d, "ca.crt"),
		"--token-auth-file="+filepath.Join(d, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file="+filepath.Join(d, "sa.key"),
		"--service-account-signing-key-file="+filepath.Join(d, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/16,fd00:96::/108",
		"--endpoint-reconciler-type=none",
		"--enable-priority-and-fairness=false",
		"--v=0",
	)
	rt, err := rest.TransportFor(c.Config)
	if err != nil {
		c.t.Fatalf("kubetest: transport: %v", err)
	}
	if err := waitHTTP(c.Config.Host+"/readyz", rt, 90*time.Second, c.apisrv); err != nil {
		c.t.Fatalf("kubetest: kube-apiserver not ready: %v\n%s", err, tail(c.apisrv.log.String(), 4000))
	}
}

// StopAPIServer stops the API server (SIGTERM, then SIGKILL after 10 s) and keeps etcd, so a
// later StartAPIServer finds every object again: what a control-plane restart looks like to a
// node agent.
func (c *Cluster) StopAPIServer() {
	c.mu.Lock()
	p := c.apisrv
	c.apisrv = nil
	c.mu.Unlock()
	p.stop()
}

// KillAPIServer kills the API server with SIGKILL (no graceful close of watches).
func (c *Cluster) KillAPIServer() {
	c.mu.Lock()
	p := c.apisrv
	c.apisrv = nil
	c.mu.Unlock()
	if p != nil {
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

func (c *Cluster) stop() {
	c.StopAPIServer()
	c.mu.Lock()
	e := c.etcd
	c.etcd = nil
	c.mu.Unlock()
	e.stop()
}

func (c *Cluster) run(bin string, args ...string) *process {
	c.t.Helper()
	p := &process{cmd: exec.Command(bin, args...), done: make(chan struct{}), log: &bytes.Buffer{}}
	w := &syncWriter{b: p.log}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	// Killed with the test binary if it dies without running its cleanups.
	if err := proctest.Start(p.cmd); err != nil {
		c.t.Fatalf("kubetest: %v", err)
	}
	go func() { _ = p.cmd.Wait(); close(p.done) }()
	return p
}

func (p *process) stop() {
	if p == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
	}
}

type syncWriter struct {
	mu sync.Mutex
	b  *bytes.Buffer
}

func (w *syncWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

// waitHTTP polls url until it answers 200, the process exits, or the timeout passes.
func waitHTTP(url string, rt http.RoundTripper, timeout time.Duration, p *process) error {
	client := &http.Client{Transport: rt, Timeout: 2 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for {
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
		resp, err := client.Do(req)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
			err = fmt.Errorf("%s: %s", url, resp.Status)
		}
		last = err
		select {
		case <-p.done:
			return errors.New("process exited")
		case <-ctx.Done():
			return fmt.Errorf("timed out: %w", last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// freePorts reserves n loopback ports by listening on them and closing the listeners at once.
func freePorts(t testing.TB, n int) []int {
	t.Helper()
	var ls []net.Listener
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	for _, l := range ls {
		l.Close()
	}
	return ports
}

func newCA(t testing.TB) (*x509.Certificate, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "kdpt-ca"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return cert, key
}

func newServerCert(t testing.TB, ca *x509.Certificate, caKey *ecdsa.PrivateKey) ([]byte, *ecdsa.PrivateKey) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "kube-apiserver"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"localhost"},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return der, key
}

func writePEM(t testing.TB, path, typ string, der []byte) {
	t.Helper()
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
}

func writeKey(t testing.TB, path string, key any) {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	writePEM(t, path, "PRIVATE KEY", der)
}

func randomToken(t testing.TB) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf("%x", b)
}
