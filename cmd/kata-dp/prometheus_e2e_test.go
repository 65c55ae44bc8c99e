package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

// TestPrometheusScrapesAgent: a real Prometheus (Debian's 2.42) on the loopback of the test
// netns scrapes the real agent's /metrics while traffic, a spoofed frame and load-balanced
// connections cross a sandbox's BPF datapath; its HTTP API then answers with the endpoint,
// drop and load-balancer series at the right values.
func TestPrometheusScrapesAgent(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane and Prometheus in namespaces")
	promBin, err := exec.LookPath("prometheus")
	if err != nil {
		t.Fatalf("prometheus not found (Debian package prometheus; hack/install-deps.sh installs it): %v", err)
	}
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: "kdptp", NoTap: true})
	guest := topotest.MustNetNS(t, "kdptpg")
	guest.DisableIPv6()
	dir := t.TempDir()
	// The netns is the test's own: these ports are free on its loopback.
	const agentAddr, promAddr = "127.0.0.1:19401", "127.0.0.1:19402"
	a, p := startTestAgent(t, sb.Host, sb.NS, "kdptp", "--metrics-addr", agentAddr)

	a.check(t, "", []string{"sandbox", "add", sandboxID, "--netns", sb.NS.Path()}, result{stdout: sandboxID + "\n"})
	const mac = "02:42:20:6f:a3:69"
	in := fmt.Sprintf(`{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"%s","mask":"24"}],"hwAddr":"%s","mtu":1500}`,
		sb.GuestAddr.Addr(), mac)
	if r := a.cli(t, in, "kata-network", "add-iface", "6ec", "-"); r.code != 0 {
		t.Fatalf("add-iface: %+v\n%s", r, p.stderr)
	}
	route := `{"dest":"default","gateway":"` + sb.HostAddr.Addr().String() + `","device":"eth-test"}`
	a.check(t, route, []string{"kata-network", "add-route", "6ec", "-"}, result{stdout: "[" + route + "]\n"})
	hw, _ := net.ParseMAC(mac)
	emulateGuest(t, sb.NS.Path(), "tap-test", guest, "eth0", guestemu.BridgeOptions{MAC: hw, Addrs: []netip.Prefix{sb.GuestAddr}, Gateway: sb.HostAddr.Addr()})

	// Traffic: 5 echo requests to the guest.
	if err := sb.Host.Ping(sb.GuestAddr.Addr().String(), 5, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// A spoofed source: 3 echo requests from an address the guest does not own.
	spoofed := sb.GuestAddr.Addr().As4()
	spoofed[3] = 99
	spoof := netip.AddrFrom4(spoofed).String()
	guest.Exec("ip", "addr", "add", spoof+"/24", "dev", "eth0")
	if _, err := guest.Exec("ip", "neigh", "replace", sb.HostAddr.Addr().String(), "lladdr", sb.HostVeth.MAC.String(), "dev", "eth0"); err != nil {
		t.Fatal(err)
	}
	guest.Exec("ping", "-n", "-q", "-c", "3", "-i", "0.05", "-W", "1", "-I", spoof, sb.HostAddr.Addr().String())
	guest.Exec("ip", "addr", "del", spoof+"/24", "dev", "eth0")

	// A kata-ipvs service with one real server on the host side, and 3 connections to it.
	real := sb.HostAddr.Addr().As4()
	real[3] = 11
	server := netip.AddrFrom4(real).String()
	if _, err := sb.Host.Exec("ip", "addr", "add", server+"/24", "dev", sb.HostVeth.Name); err != nil {
		t.Fatal(err)
	}
	l, err := sb.Host.Listen("tcp", server+":80")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go serveLine(l, func(net.Conn) string { return "hello" })
	const vip = "10.96.0.10"
	for _, params := range []string{"--add-service --tcp-service " + vip + ":80 --scheduler rr --persistent 60", "-a -t " + vip + ":80 -r " + server + ":80 -m"} {
		if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--parameters", params, "6ec"); r.code != 0 {
			t.Fatalf("kata-ipvs %s: %+v", params, r)
		}
	}
	for range 3 {
		c, err := guest.Dial("tcp", vip+":80", 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if line, err := bufio.NewReader(c).ReadString('\n'); err != nil || line != "hello\n" {
			t.Errorf("through the VIP: %q, %v", line, err)
		}
		c.Close()
	}

	// Prometheus, on the same loopback, scraping every second.
	cfg := filepath.Join(dir, "prometheus.yml")
	os.WriteFile(cfg, []byte("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n"+
		"  - job_name: kata-dp\n    static_configs:\n      - targets: ['"+agentAddr+"']\n"), 0o644)
	var promErr syncBuffer
	prom := exec.Command("nsenter", "--net="+sb.Host.Path(), promBin, "--config.file="+cfg, "--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address="+promAddr)
	prom.Stdout, prom.Stderr = &promErr, &promErr
	if err := proctest.Start(prom); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		prom.Process.Kill()
		prom.Wait()
	})
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: func(context.Context, string, string) (net.Conn, error) {
		return sb.Host.Dial("tcp", promAddr, 5*time.Second)
	}}}
	query := func(q string) (float64, bool) {
		resp, err := hc.Get("http://prometheus/api/v1/query?query=" + url.QueryEscape(q))
		if err != nil {
			return 0, false
		}
		defer resp.Body.Close()
		var r struct {
			Status string
			Data   struct {
				Result []struct {
					Value [2]any
				}
			}
		}
		b, _ := io.ReadAll(resp.Body)
		if json.Unmarshal(b, &r) != nil || r.Status != "success" || len(r.Data.Result) != 1 {
			return 0, false
		}
		s, _ := r.Data.Result[0].Value[1].(string)
		v, err := strconv.ParseFloat(s, 64)
		return v, err == nil
	}
	sel := `sandbox="` + sandboxID + `"`
	for _, c := range []struct {
		q  string
		ok func(float64) bool
	}{
		{`up{job="kata-dp"}`, func(v float64) bool { return v == 1 }},
		{`kata_dp_endpoint_packets_total{` + sel + `,nic="eth-test",mode="tc",direction="to_guest"}`, func(v float64) bool { return v >= 5 }},
		{`kata_dp_endpoint_packets_total{` + sel + `,nic="eth-test",mode="tc",direction="from_guest"}`, func(v float64) bool { return v >= 5 }},
		{`kata_dp_endpoint_drops_total{` + sel + `,nic="eth-test",direction="from_guest",reason="spoof_ip"}`, func(v float64) bool { return v == 3 }},
		{`kata_dp_lb_service_connections_total{` + sel + `,protocol="TCP",service="` + vip + `:80"}`, func(v float64) bool { return v == 3 }},
		{`kata_dp_lb_server_connections_total{` + sel + `,service="` + vip + `:80",server="` + server + `:80"}`, func(v float64) bool { return v == 3 }},
		{`kata_dp_lb_service_packets_total{` + sel + `,service="` + vip + `:80",direction="in"}`, func(v float64) bool { return v >= 9 }},
		{`kata_dp_conntrack_capacity{` + sel + `}`, func(v float64) bool { return v > 0 }},
		{`kata_dp_sandboxes{state="ready"}`, func(v float64) bool { return v == 1 }},
	} {
		// Wait for Prometheus to have scraped (it starts, then scrapes every second).
		deadline := time.Now().Add(30 * time.Second)
		for {
			v, ok := query(c.q)
			if ok && c.ok(v) {
				break
			}
			if time.Now().After(deadline) {
				t.Errorf("%s = %v (found %v)\nprometheus:\n%s", c.q, v, ok, promErr.String())
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	a.check(t, "", []string{"sandbox", "del", sandboxID}, result{})
}
