package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/kata-dp/kata-dp/bench/guestemu"
	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/kube/kubetest"
)

// kubeBox is one sandbox of the Kubernetes test: its topology, the guest emulator's netns
// and the backends on its host side (the same addresses in every box, each answering with its
// name).
type kubeBox struct {
	id    string
	sb    *topo.Sandbox
	guest *topo.NetNS
}

const kubeVIP = "10.96.0.10"

func newKubeBox(t *testing.T, a *testAgent, prefix, id string) *kubeBox {
	t.Helper()
	tap := "tap-" + prefix[len(prefix)-2:] // device names are unique on the node
	sb := topotest.MustSandbox(t, topo.SandboxConfig{Prefix: prefix, NoTap: true})
	guest := topotest.MustNetNS(t, prefix+"g")
	guest.DisableIPv6()
	a.check(t, "", []string{"sandbox", "add", id, "--netns", sb.NS.Path()}, result{stdout: id + "\n"})
	const mac = "02:42:20:6f:a3:69"
	in := fmt.Sprintf(`{"device":"%s","name":"eth-test","IPAddresses":[{"address":"%s","mask":"24"}],"hwAddr":"%s","mtu":1500}`,
		tap, sb.GuestAddr.Addr(), mac)
	if r := a.cli(t, in, "kata-network", "add-iface", id, "-"); r.code != 0 {
		t.Fatalf("add-iface: %+v", r)
	}
	route := `{"dest":"default","gateway":"` + sb.HostAddr.Addr().String() + `","device":"eth-test"}`
	a.check(t, route, []string{"kata-network", "add-route", id, "-"}, result{stdout: "[" + route + "]\n"})
	hw, _ := net.ParseMAC(mac)
	emulateGuest(t, sb.NS.Path(), tap, guest, "eth0", guestemu.BridgeOptions{MAC: hw, Addrs: []netip.Prefix{sb.GuestAddr}, Gateway: sb.HostAddr.Addr()})
	b := &kubeBox{id: id, sb: sb, guest: guest}
	// Backends: be1 and be2 on 8080/tcp and 5353/udp, be2 on 8081 too (the port change),
	// and a kata-ipvs real server on .13:80.
	for _, s := range []struct {
		last, port int
		name       string
	}{{11, 8080, "be1"}, {12, 8080, "be2"}, {12, 8081, "be2-8081"}, {13, 80, "kata"}} {
		addr := hostAddr(sb, s.last)
		sb.Host.Exec("ip", "addr", "add", addr+"/24", "dev", sb.HostVeth.Name) // once per address; repeats fail harmlessly
		l, err := sb.Host.Listen("tcp", fmt.Sprintf("%s:%d", addr, s.port))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		go serveName(l, s.name)
		if s.port == 8080 {
			serveUDPName(t, sb.Host, addr+":5353", s.name)
		}
	}
	return b
}

func hostAddr(sb *topo.Sandbox, last int) string {
	a := sb.HostAddr.Addr().As4()
	a[3] = byte(last)
	return netip.AddrFrom4(a).String()
}

// serveName answers every connection with its name on a line, then echoes the name for every
// line it reads (so an open connection shows which server it is on).
func serveName(l net.Listener, name string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			fmt.Fprintln(c, name)
			r := bufio.NewReader(c)
			for {
				if _, err := r.ReadString('\n'); err != nil {
					return
				}
				fmt.Fprintln(c, name)
			}
		}()
	}
}

// serveLine answers every connection with line(c) and closes it: a server whose reply says
// the connection arrived (and, with the peer's address in it, from where after the NAT).
func serveLine(l net.Listener, line func(net.Conn) string) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		fmt.Fprintln(c, line(c))
		c.Close()
	}
}

// serveUDPName answers every datagram to addr in ns with name, until the test ends.
func serveUDPName(t *testing.T, ns *topo.NetNS, addr, name string) {
	t.Helper()
	pc, err := ns.ListenPacket("udp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 64)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo([]byte(name), from)
		}
	}()
}

// dial returns the name of the server a new TCP connection from the guest to the VIP reaches
// ("" when none answers within a second).
func (b *kubeBox) dial(port int) string {
	c, err := b.guest.Dial("tcp", fmt.Sprintf("%s:%d", kubeVIP, port), time.Second)
	if err != nil {
		return ""
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return ""
	}
	return strings.TrimSpace(line)
}

// ask sends one datagram on u and returns the answering server's name ("" on timeout).
func ask(u net.Conn) string {
	u.Write([]byte("q"))
	u.SetReadDeadline(time.Now().Add(time.Second))
	buf := make([]byte, 64)
	n, err := u.Read(buf)
	if err != nil {
		return ""
	}
	return string(buf[:n])
}

// eventually waits (bounded) until cond holds.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("not reached within 30 s: %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func webSlice(eps []string, httpPort int32) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-1", Namespace: "kdpt", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{
			{Name: ptr.To("http"), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To(httpPort)},
			{Name: ptr.To("dns"), Protocol: ptr.To(corev1.ProtocolUDP), Port: ptr.To[int32](5353)},
		},
	}
	for _, e := range eps {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{e}, NodeName: ptr.To("node-a")})
	}
	return sl
}

// TestKubernetesServices runs the real agent against a real API server and etcd (kubetest)
// with two sandboxes whose guests (guestemu) reach backends on their host side through the
// Service's ClusterIP, with real TCP and UDP: scale up and down and a port change (new
// connections follow, an open one keeps its server, UDP flows to a removed endpoint are
// cleaned), a kata-ipvs rule on the same VIP wins in its sandbox only and lists only itself,
// the API server killed (traffic keeps flowing, the status says so) and restarted (a change
// made after it converges), sessionAffinity ClientIP, the agent killed and restarted while
// the API server is down (the pinned datapath keeps serving until the first sync), and the
// Service deleted (gone from both sandboxes).
func TestKubernetesServices(t *testing.T) {
	topotest.RequireRoot(t, "runs the agent with the BPF dataplane in namespaces")
	kc := kubetest.Start(t)
	ctx := context.Background()
	cs := kc.Client
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "kdpt"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "kdpt"}, Spec: corev1.ServiceSpec{
		ClusterIP: kubeVIP,
		Ports: []corev1.ServicePort{
			{Name: "http", Protocol: corev1.ProtocolTCP, Port: 80, TargetPort: intstr.FromString("web")},
			{Name: "dns", Protocol: corev1.ProtocolUDP, Port: 53, TargetPort: intstr.FromInt32(5353)},
		}}}
	if _, err := cs.CoreV1().Services("kdpt").Create(ctx, svc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	be1, be2 := "10.199.0.11", "10.199.0.12"
	slices := cs.DiscoveryV1().EndpointSlices("kdpt")
	if _, err := slices.Create(ctx, webSlice([]string{be1}, 8080), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	setSlice := func(eps []string, port int32) {
		t.Helper()
		if _, err := slices.Update(ctx, webSlice(eps, port), metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	sock, agentArgs := agentFiles(t, "kdptk", "--config", "", "--kata-dir", "", "--kubeconfig", kc.Kubeconfig, "--node-name", "node-a")
	p := startAgentProcess(t, nil, agentArgs...)
	waitAgent(t, sock, p)
	a := &testAgent{sock: sock}
	boxes := []*kubeBox{
		newKubeBox(t, a, "kdptk1", "1111aaaa2222bbbb3333cccc4444dddd"),
		newKubeBox(t, a, "kdptk2", "5555eeee6666ffff7777aaaa8888bbbb"),
	}
	report := func() (r struct {
		Synced, Connected bool
		Rules             int
		Sandboxes         map[string]struct{ Programmed, Overridden int }
	}) {
		t.Helper()
		out := a.cli(t, "", "status", "--cluster", "-o", "json")
		if out.code != 0 {
			t.Fatalf("status --cluster: %+v\n%s", out, p.stderr)
		}
		if err := json.Unmarshal([]byte(out.stdout), &r); err != nil {
			t.Fatal(err)
		}
		return r
	}

	// Both sandboxes reach be1 over TCP (a named target port) and UDP.
	udp := make([]net.Conn, len(boxes))
	for i, b := range boxes {
		eventually(t, b.id+" reaches be1 through the ClusterIP", func() bool { return b.dial(80) == "be1" })
		u, err := b.guest.Dial("udp", kubeVIP+":53", time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer u.Close()
		udp[i] = u
		if got := ask(u); got != "be1" {
			t.Fatalf("%s: udp answer %q, want be1\n%s", b.id, got, p.stderr)
		}
	}
	// The API server has its own Service (default/kubernetes, without endpoints here).
	base := report()
	if !base.Synced || !base.Connected || base.Rules < 4 || base.Sandboxes[boxes[0].id].Programmed < 2 {
		t.Errorf("status --cluster: %+v", base)
	}
	all := base.Sandboxes[boxes[0].id].Programmed
	// An open connection, which must stay on be1 throughout.
	open, err := boxes[0].guest.Dial("tcp", kubeVIP+":80", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer open.Close()
	openR := bufio.NewReader(open)
	stillBE1 := func() {
		t.Helper()
		fmt.Fprintln(open, "ping")
		open.SetReadDeadline(time.Now().Add(2 * time.Second))
		if line, err := openR.ReadString('\n'); err != nil || strings.TrimSpace(line) != "be1" {
			t.Fatalf("the open connection: %q, %v (want be1: established connections keep their server)", line, err)
		}
	}
	stillBE1()

	// Scale up: new connections reach be2 too.
	setSlice([]string{be1, be2}, 8080)
	for _, b := range boxes {
		eventually(t, b.id+" reaches be2 after the scale-up", func() bool { return b.dial(80) == "be2" })
	}
	stillBE1()
	// Scale down to be2: every new connection goes there, the open one stays, and the UDP
	// flow to the removed be1 is cleaned and moves to be2.
	setSlice([]string{be2}, 8080)
	for i, b := range boxes {
		eventually(t, b.id+" reaches only be2 after the scale-down", func() bool {
			for range 4 {
				if b.dial(80) != "be2" {
					return false
				}
			}
			return true
		})
		eventually(t, b.id+"'s UDP flow moves to be2", func() bool { return ask(udp[i]) == "be2" })
	}
	stillBE1()
	// Port change.
	setSlice([]string{be2}, 8081)
	for _, b := range boxes {
		eventually(t, b.id+" follows the port change", func() bool { return b.dial(80) == "be2-8081" })
	}

	// A kata-ipvs rule on the same VIP:port wins in its sandbox only, and kata-ipvs lists only
	// its own rules there.
	kata := boxes[0]
	for _, params := range []string{"--add-service --tcp-service " + kubeVIP + ":80 --scheduler rr --persistent 60", "-a -t " + kubeVIP + ":80 -r 10.199.0.13:80 -m"} {
		if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--parameters", params, kata.id); r.code != 0 {
			t.Fatalf("kata-ipvs %s: %+v", params, r)
		}
	}
	if got := kata.dial(80); got != "kata" {
		t.Errorf("%s with a kata-ipvs rule on the VIP: %q, want kata", kata.id, got)
	}
	if got := boxes[1].dial(80); got != "be2-8081" {
		t.Errorf("%s without a kata-ipvs rule: %q, want the cluster's be2-8081", boxes[1].id, got)
	}
	if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--parameters", "-S -n", kata.id); r.code != 0 || strings.Contains(r.stdout, "10.199.0.12") || strings.Contains(r.stdout, ":53") {
		t.Errorf("kata-ipvs --save shows the cluster's rules: %+v", r)
	}
	if r := report(); r.Sandboxes[kata.id].Overridden != 1 || r.Sandboxes[kata.id].Programmed != all-1 || r.Sandboxes[boxes[1].id].Programmed != all {
		t.Errorf("status --cluster with the override: %+v", r)
	}
	if r := a.cli(t, "", "kata-ipvs", "ipvsadm", "--parameters", "-D -t "+kubeVIP+":80", kata.id); r.code != 0 {
		t.Fatalf("kata-ipvs delete: %+v", r)
	}
	if got := kata.dial(80); got != "be2-8081" {
		t.Errorf("%s after the kata-ipvs rule is gone: %q, want the cluster's be2-8081", kata.id, got)
	}

	// The API server goes away: traffic keeps flowing, the status says so.
	kc.KillAPIServer()
	for range 3 {
		for _, b := range boxes {
			if got := b.dial(80); got != "be2-8081" {
				t.Fatalf("%s with the API server down: %q, want be2-8081", b.id, got)
			}
		}
	}
	eventually(t, "the status says the API server is unreachable", func() bool { return !report().Connected })
	kc.StartAPIServer()
	eventually(t, "the status says the API server is back", func() bool { return report().Connected })
	setSlice([]string{be1}, 8080)
	for _, b := range boxes {
		eventually(t, b.id+" converges after the restart", func() bool { return b.dial(80) == "be1" })
	}

	// sessionAffinity ClientIP: with two real servers, every new connection of a guest goes to
	// the same one (rr alone alternates).
	setSlice([]string{be1, be2}, 8080)
	for _, b := range boxes {
		eventually(t, b.id+" reaches be2 again", func() bool { return b.dial(80) == "be2" })
	}
	cur, err := cs.CoreV1().Services("kdpt").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
	cur.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](60)}}
	if _, err := cs.CoreV1().Services("kdpt").Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, b := range boxes {
		eventually(t, b.id+" sticks to one server", func() bool {
			first := b.dial(80)
			for range 5 {
				if b.dial(80) != first {
					return false
				}
			}
			return first != ""
		})
	}

	// The agent killed and started again while the API server is down: the pinned datapath
	// keeps serving the cluster's services until the first sync after the API server is back
	// replaces them.
	p.cmd.Process.Kill()
	p.cmd.Wait()
	kc.StopAPIServer()
	p = startAgentProcess(t, nil, agentArgs...)
	waitAgent(t, sock, p)
	for range 3 {
		for _, b := range boxes {
			if got := b.dial(80); got != "be1" && got != "be2" {
				t.Fatalf("%s after the agent restart, API server down: %q, want be1 or be2\n%s", b.id, got, p.stderr)
			}
		}
	}
	if r := report(); r.Synced {
		t.Errorf("synced without an API server: %+v", r)
	}
	kc.StartAPIServer()
	eventually(t, "the restarted agent syncs", func() bool { return report().Synced })
	for _, b := range boxes {
		if got := b.dial(80); got != "be1" && got != "be2" {
			t.Fatalf("%s after the first sync of the restarted agent: %q\n%s", b.id, got, p.stderr)
		}
	}

	// Delete: gone from every sandbox.
	if err := cs.CoreV1().Services("kdpt").Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := slices.Delete(ctx, "web-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the Service is gone from every sandbox", func() bool {
		r := report()
		return r.Rules == base.Rules-4 && r.Sandboxes[boxes[0].id].Programmed == all-2 && r.Sandboxes[boxes[1].id].Programmed == all-2
	})
	for _, b := range boxes {
		if got := b.dial(80); got != "" {
			t.Errorf("%s after the delete: %q answered through the VIP", b.id, got)
		}
	}
}
