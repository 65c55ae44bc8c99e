package kube_test

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"

	"github.com/kata-dp/kata-dp/bench/topo/topotest"
	"github.com/kata-dp/kata-dp/control/clusterlb"
	"github.com/kata-dp/kata-dp/control/dataplane"
	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/kube"
	"github.com/kata-dp/kata-dp/control/kube/kubetest"
	"github.com/kata-dp/kata-dp/loader"
)

var (
	benchServices  = flag.Int("kube-services", 5000, "BenchmarkClusterSync: Services (one port each)")
	benchEndpoints = flag.Int("kube-endpoints", 3, "BenchmarkClusterSync: endpoints per Service")
	benchSandboxes = flag.Int("kube-sandboxes", 100, "BenchmarkClusterSync: sandboxes (BPF collections: LB maps and programs, no netns)")
	benchChanges   = flag.Int("kube-changes", 20, "BenchmarkClusterSync: endpoint changes timed")
)

// timedTarget passes the table on and tells, after each write into every sandbox, which keys
// it carried.
type timedTarget struct {
	*clusterlb.Tables
	done chan []ipvs.ServiceKey
}

func (t timedTarget) SetCluster(ctx context.Context, c map[ipvs.ServiceKey]*ipvs.Service, changed []ipvs.ServiceKey) error {
	err := t.Tables.SetCluster(ctx, c, changed)
	select {
	case t.done <- changed:
	default:
	}
	return err
}

func benchSlice(i, gen int) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: fmt.Sprintf("s%d-1", i), Namespace: "bench", Labels: map[string]string{discoveryv1.LabelServiceName: fmt.Sprintf("s%d", i)}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To(""), Protocol: ptr.To(corev1.ProtocolTCP), Port: ptr.To[int32](8080)}},
	}
	for e := range *benchEndpoints {
		n := i*(*benchEndpoints) + e + gen
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.%d.%d.%d", 128+n>>16&63, n>>8&255, n&255)}})
	}
	return sl
}

func parallel(n, workers int, fn func(i int) error) error {
	var mu sync.Mutex
	var first error
	var wg sync.WaitGroup
	next := make(chan int)
	for range workers {
		wg.Go(func() {
			for i := range next {
				if err := fn(i); err != nil {
					mu.Lock()
					if first == nil {
						first = err
					}
					mu.Unlock()
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}

func heapInuse() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse
}

// BenchmarkClusterSync: -kube-services Services with -kube-endpoints endpoints each in a real
// API server, synced by the real informers into -kube-sandboxes sandboxes' real BPF load
// balancers (collections loaded and pinned, no netns or devices: the LB maps are what a sync
// writes). It reports the time to the first full sync, the agent's Go heap for the cluster
// table and informers, the BPF map memory of one sandbox, and for -kube-changes endpoint
// changes the time from the API server's answer to the update until every sandbox's maps have
// it. One scenario, whatever b.N: run with -benchtime 1x (docs/kubernetes.md).
func BenchmarkClusterSync(b *testing.B) {
	topotest.RequireRoot(b, "loads BPF collections")
	kc := kubetest.Start(b)
	ctx := context.Background()
	cfg := rest.CopyConfig(kc.Config)
	cfg.QPS, cfg.Burst = 2000, 4000
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		b.Fatal(err)
	}
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench"}}, metav1.CreateOptions{}); err != nil {
		b.Fatal(err)
	}
	n := *benchServices
	start := time.Now()
	err = parallel(n, 32, func(i int) error {
		ip := netip.AddrFrom4([4]byte{10, 96, byte(1 + i>>8), byte(i)}) // 10.96.1.0 up: the API server's own is 10.96.0.1
		_, err := cs.CoreV1().Services("bench").Create(ctx, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("s%d", i), Namespace: "bench"},
			Spec: corev1.ServiceSpec{ClusterIP: ip.String(), Ports: []corev1.ServicePort{{Protocol: corev1.ProtocolTCP, Port: 80}}}}, metav1.CreateOptions{})
		if err != nil {
			return err
		}
		_, err = cs.DiscoveryV1().EndpointSlices("bench").Create(ctx, benchSlice(i, 0), metav1.CreateOptions{})
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Logf("created %d Services and EndpointSlices in %v", n, time.Since(start).Round(time.Millisecond))

	root := topotest.BPFFS(b, "kdptkb")
	dp, err := dataplane.New(root)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { dp.Close() })
	ids := make([]string, *benchSandboxes)
	for i := range ids {
		ids[i] = fmt.Sprintf("kdptkb%04d", i)
		if err := dp.EnsureSandbox(ctx, ids[i], ""); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { loader.Remove(root, ids[i]) })
	}
	emptyMem, _ := dp.MapMemory(ctx, ids[0])

	before := heapInuse()
	tables := clusterlb.New(dp, func() []string { return ids }, nil)
	tables.Started()
	target := timedTarget{Tables: tables, done: make(chan []ipvs.ServiceKey, 1)}
	syncer, err := kube.New(target, kube.Options{Config: kc.Config, Node: "node-a", MaxRules: n*(1+*benchEndpoints) + 16})
	if err != nil {
		b.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	b.Cleanup(cancel)
	b.ResetTimer()
	start = time.Now()
	go syncer.Run(rctx)
	for !tables.Synced() {
		time.Sleep(5 * time.Millisecond)
	}
	first := time.Since(start)
	select {
	case <-target.done:
	default:
	}
	st := syncer.Status()
	if st.VirtualServices < n {
		b.Fatalf("first sync: %d virtual services, want %d", st.VirtualServices, n)
	}
	heap := heapInuse() - before
	mem, err := dp.MapMemory(ctx, ids[0])
	if err != nil {
		b.Fatal(err)
	}
	var total, empty uint64
	for _, v := range mem {
		total += v
	}
	for _, v := range emptyMem {
		empty += v
	}
	rep, werr := tables.Status()
	if werr != 0 || rep[ids[len(ids)-1]].Programmed < n {
		b.Fatalf("sandboxes: %d write errors, last sandbox %+v", werr, rep[ids[len(ids)-1]])
	}

	// Endpoint changes: one Service's endpoints move; timed from the API server's answer to
	// every sandbox written.
	var lags []time.Duration
	for c := range *benchChanges {
		i := (c * 7919) % n
		want := ipvs.ServiceKey{Proto: ipvs.TCP, Addr: netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, 96, byte(1 + i>>8), byte(i)}), 80)}
		if _, err := cs.DiscoveryV1().EndpointSlices("bench").Update(ctx, benchSlice(i, 1+c), metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		for got := false; !got; {
			select {
			case keys := <-target.done:
				got = slices.Contains(keys, want)
			case <-time.After(30 * time.Second):
				b.Fatalf("change %d not written within 30 s", c)
			}
		}
		lags = append(lags, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(lags)
	med, worst := lags[len(lags)/2], lags[len(lags)-1]
	b.ReportMetric(first.Seconds(), "first-sync-s")
	b.ReportMetric(float64(heap)/(1<<20), "heap-MiB")
	b.ReportMetric(float64(total)/(1<<20), "bpf-MiB/sandbox")
	b.ReportMetric(float64(med.Microseconds())/1000, "change-median-ms")
	b.ReportMetric(float64(worst.Microseconds())/1000, "change-max-ms")
	b.Logf("%d services x %d endpoints into %d sandboxes: first sync %v; Go heap +%.1f MiB; BPF maps %.1f MiB per sandbox (%.1f MiB empty); one endpoint change into every sandbox: median %v, max %v (%d changes)",
		n, *benchEndpoints, len(ids), first.Round(time.Millisecond), float64(heap)/(1<<20), float64(total)/(1<<20), float64(empty)/(1<<20), med, worst, len(lags))
}
