// Package ctlperf measures the agent's control path with the real BPF dataplane: add-iface
// without hot-plug (tap created, datapath attached, maps written, state saved), and the memory
// cost of sandboxes (agent RSS and BPF map memory per sandbox).
//
// Run (root): go test -run XXX -bench . -benchtime 20x ./bench/ctlperf/
//
// To compare two builds side by side, build each agent as `make build` does (CGO_ENABLED=0 go
// build -o /tmp/old ./cmd/kata-dp at one commit, /tmp/new at another) and run the benchmark
// once per binary, interleaved, with KDP_CTLPERF_AGENT naming the binary to run instead of
// building the current tree.
package ctlperf

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"

	"github.com/kata-dp/kata-dp/bench/topo"
	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/ipvs/ipvstest"
	"github.com/kata-dp/kata-dp/internal/proctest"
)

type agent struct {
	cmd   *exec.Cmd
	c     *api.Client
	bpffs string
	bin   string
	sock  string
}

// startAgent builds and runs the real kata-dp agent with its state and pins in places of its own.
func startAgent(b *testing.B) *agent {
	topotest.RequireRoot(b, "runs the agent with the BPF dataplane")
	dir := b.TempDir()
	bin := os.Getenv("KDP_CTLPERF_AGENT")
	if bin == "" {
		bin = filepath.Join(dir, "kata-dp")
		// Built as `make build` builds it, static: a cgo build starts through the dynamic
		// loader and libc (2-3 ms more per CLI process here), which the shipped binary never does.
		build := exec.Command("go", "build", "-o", bin, "github.com/kata-dp/kata-dp/cmd/kata-dp")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			b.Fatalf("build: %v\n%s", err, out)
		}
	}
	sock := filepath.Join(dir, "s.sock")
	a := &agent{bpffs: topotest.BPFFS(b, "kdptcp"), bin: bin, sock: sock}
	a.cmd = exec.Command(bin, "agent", "--socket", sock, "--state-dir", filepath.Join(dir, "state"), "--bpffs-root", a.bpffs, "--log-level", "warn")
	a.cmd.Stderr = os.Stderr
	if err := proctest.Start(a.cmd); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		a.cmd.Process.Kill()
		a.cmd.Wait()
	})
	a.c = api.NewClient(sock)
	for i := 0; ; i++ {
		if _, err := a.c.Version(context.Background()); err == nil {
			break
		}
		if i > 200 {
			b.Fatal("agent did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return a
}

func stats(b *testing.B, ds []time.Duration) { statsAs(b, "", ds) }

// statsAs reports the median, min and max of ds as prefix+"median-ms" and so on.
func statsAs(b *testing.B, prefix string, ds []time.Duration) {
	slices.Sort(ds)
	b.ReportMetric(float64(ds[len(ds)/2].Microseconds())/1000, prefix+"median-ms")
	b.ReportMetric(float64(ds[0].Microseconds())/1000, prefix+"min-ms")
	b.ReportMetric(float64(ds[len(ds)-1].Microseconds())/1000, prefix+"max-ms")
}

// BenchmarkAddIface: add-iface (then del-iface, untimed) of one NIC joined to the sandbox's
// uplink, over the agent's API, without hot-plug.
func BenchmarkAddIface(b *testing.B) {
	a := startAgent(b)
	ctx := context.Background()
	sb := topotest.MustSandbox(b, topo.SandboxConfig{Prefix: "kdptcp", NoTap: true})
	if _, err := a.c.AddSandbox(ctx, control.SandboxSpec{ID: "perf", NetNS: sb.NS.Path()}); err != nil {
		b.Fatal(err)
	}
	in := []byte(`{"device":"tap-perf","name":"eth-perf","IPAddresses":[{"address":"10.199.0.2","mask":"24"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500}`)
	var ds []time.Duration
	b.ResetTimer()
	for range b.N {
		start := time.Now()
		if _, err := a.c.KataNetwork(ctx, "perf", "add-iface", in); err != nil {
			b.Fatal(err)
		}
		ds = append(ds, time.Since(start))
		b.StopTimer()
		if _, err := a.c.KataNetwork(ctx, "perf", "del-iface", in); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	stats(b, ds)
}

// rules20000 is a kata-ipvs restore file of 20000 rules: 5000 rr services with three real
// servers each (bench/lbperf's table).
func rules20000() string {
	return ipvstest.Rules(5000)
}

// BenchmarkRestoreCLI: `kata-dp kata-ipvs ipvsadm --restore -` of 20000 rules, timed from the
// CLI's start to its exit: the CLI reads the file and posts it, the agent parses and
// validates it, writes the maps beside the live ones, switches, saves the table (fsync) and
// answers. Then --clear, untimed. The agent answers once the datapath serves the rules and
// writes the real servers of rr and wrr services after that (control/dataplane, RestoreLB):
// agent-cpu-ms, taken when the CLI exits, may miss that write; agent-cycle-cpu-ms is the
// agent's CPU over the restore and the --clear (which waits for it), the same work whatever
// the build.
func BenchmarkRestoreCLI(b *testing.B) {
	a := startAgent(b)
	ctx := context.Background()
	sb := topotest.MustSandbox(b, topo.SandboxConfig{Prefix: "kdptcp", NoTap: true})
	if _, err := a.c.AddSandbox(ctx, control.SandboxSpec{ID: "perf", NetNS: sb.NS.Path()}); err != nil {
		b.Fatal(err)
	}
	rules := rules20000()
	var ds, cliCPU, agentCPU, cycleCPU []time.Duration
	var faults []float64
	b.ResetTimer()
	for range b.N {
		cmd := exec.Command(a.bin, "kata-ipvs", "ipvsadm", "--socket", a.sock, "--restore", "-", "perf")
		cmd.Stdin = strings.NewReader(rules)
		cpu0 := a.cpu()
		start := time.Now()
		out, err := cmd.CombinedOutput()
		ds = append(ds, time.Since(start))
		agentCPU = append(agentCPU, a.cpu()-cpu0)
		if err != nil {
			b.Fatalf("restore: %v\n%s", err, out)
		}
		ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
		cliCPU = append(cliCPU, time.Duration(syscall.TimevalToNsec(ru.Utime)+syscall.TimevalToNsec(ru.Stime)))
		faults = append(faults, float64(ru.Minflt))
		b.StopTimer()
		if _, err := a.c.KataIPVS(ctx, "perf", api.IPVSOpIpvsadm, api.IPVSRequest{Parameters: "--clear"}); err != nil {
			b.Fatal(err)
		}
		cycleCPU = append(cycleCPU, a.cpu()-cpu0)
		b.StartTimer()
	}
	b.StopTimer()
	stats(b, ds)
	slices.Sort(cycleCPU)
	b.ReportMetric(float64(cycleCPU[len(cycleCPU)/2].Microseconds())/1000, "agent-cycle-cpu-ms")
	// CPU is steadier than wall time on a shared machine: the CLI's (its start included) and
	// the agent's (all its threads), medians per restore.
	slices.Sort(cliCPU)
	slices.Sort(agentCPU)
	slices.Sort(faults)
	b.ReportMetric(float64(cliCPU[len(cliCPU)/2].Microseconds())/1000, "cli-cpu-ms")
	b.ReportMetric(float64(agentCPU[len(agentCPU)/2].Microseconds())/1000, "agent-cpu-ms")
	b.ReportMetric(faults[len(faults)/2], "cli-minflt")
}

// BenchmarkCLIStart: the cheapest commands, timed from the CLI's exec to its exit, with the
// CLI's CPU and page faults: `kata-dp --version` (no agent) and `kata-dp kata-network
// list-ifaces` of a sandbox without NICs (one call to the agent). Every kata-network and
// kata-ipvs call of the runtime pays this start.
func BenchmarkCLIStart(b *testing.B) {
	a := startAgent(b)
	sb := topotest.MustSandbox(b, topo.SandboxConfig{Prefix: "kdptcp", NoTap: true})
	if _, err := a.c.AddSandbox(context.Background(), control.SandboxSpec{ID: "perf", NetNS: sb.NS.Path()}); err != nil {
		b.Fatal(err)
	}
	for _, c := range []struct {
		name string
		args []string
	}{
		{"version", []string{"--version"}},
		{"list-ifaces", []string{"kata-network", "list-ifaces", "--socket", a.sock, "perf"}},
	} {
		b.Run(c.name, func(b *testing.B) {
			var ds, cpu []time.Duration
			var faults []float64
			for range b.N {
				cmd := exec.Command(a.bin, c.args...)
				start := time.Now()
				out, err := cmd.CombinedOutput()
				ds = append(ds, time.Since(start))
				if err != nil {
					b.Fatalf("%v: %v\n%s", c.args, err, out)
				}
				ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
				cpu = append(cpu, time.Duration(syscall.TimevalToNsec(ru.Utime)+syscall.TimevalToNsec(ru.Stime)))
				faults = append(faults, float64(ru.Minflt))
			}
			stats(b, ds)
			slices.Sort(cpu)
			slices.Sort(faults)
			b.ReportMetric(float64(cpu[len(cpu)/2].Microseconds())/1000, "cpu-ms")
			b.ReportMetric(faults[len(faults)/2], "minflt")
		})
	}
}

// cpu returns the CPU time the agent's threads have used so far (their schedstat run time,
// in ns: exact, unlike the tick-based /proc/<pid>/stat).
func (a *agent) cpu() time.Duration {
	dir := fmt.Sprintf("/proc/%d/task", a.cmd.Process.Pid)
	tasks, _ := os.ReadDir(dir)
	var sum time.Duration
	for _, t := range tasks {
		b, _ := os.ReadFile(filepath.Join(dir, t.Name(), "schedstat"))
		if f := strings.Fields(string(b)); len(f) > 0 {
			n, _ := strconv.ParseInt(f[0], 10, 64)
			sum += time.Duration(n)
		}
	}
	return sum
}

func rssKiB(pid int) int {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// mapMemory sums the kernel's memlock accounting of every map pinned under dir.
func mapMemory(b *testing.B, dir string) uint64 {
	var total uint64
	filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err != nil || fi.IsDir() || strings.Contains(path, "/links/") {
			return nil
		}
		m, err := ebpf.LoadPinnedMap(path, nil)
		if err != nil {
			return nil
		}
		defer m.Close()
		if info, err := m.Info(); err == nil {
			if n, ok := info.Memlock(); ok {
				total += n
			}
		}
		return nil
	})
	return total
}

// BenchmarkSandboxMemory registers 100 sandboxes with one NIC each and reports the agent's
// RSS and the BPF map memory, per sandbox.
func BenchmarkSandboxMemory(b *testing.B) {
	const n = 100
	a := startAgent(b)
	ctx := context.Background()
	rss0 := rssKiB(a.cmd.Process.Pid)
	for i := range n {
		ns := topotest.MustNetNS(b, "kdptcpm")
		if _, err := ns.Exec("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0"); err != nil {
			b.Fatal(err)
		}
		id := fmt.Sprintf("sb%03d", i)
		if _, err := a.c.AddSandbox(ctx, control.SandboxSpec{ID: id, NetNS: ns.Path()}); err != nil {
			b.Fatal(err)
		}
		in := fmt.Sprintf(`{"device":"tap%d","name":"eth0","IPAddresses":[{"address":"10.1.%d.2","mask":"24"}],"hwAddr":"02:42:20:00:%02x:%02x","mtu":1500}`, i, i, i/256, i%256)
		if _, err := a.c.KataNetwork(ctx, id, "add-iface", []byte(in)); err != nil {
			b.Fatal(err)
		}
	}
	rss := rssKiB(a.cmd.Process.Pid)
	mem := mapMemory(b, a.bpffs)
	b.ReportMetric(float64(rss-rss0)/n, "agent-RSS-KiB/sandbox")
	b.ReportMetric(float64(mem)/n/1024, "map-KiB/sandbox")
	b.Logf("%d sandboxes: agent RSS %d KiB (+%d KiB), BPF maps %d KiB (%d KiB per sandbox)", n, rss, rss-rss0, mem/1024, mem/n/1024)
}
