package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http"
	"slices"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

// Target is where the cluster table goes (control/clusterlb.Tables): cluster is a snapshot
// the Syncer never changes afterwards, changed the keys that differ from the last call.
type Target interface {
	SetCluster(ctx context.Context, cluster map[ipvs.ServiceKey]*ipvs.Service, changed []ipvs.ServiceKey) error
}

// Options configure a Syncer.
type Options struct {
	// Config says how to reach the API server; required. New contacts nobody: the informers
	// do, and retry with backoff while it is unreachable.
	Config *rest.Config
	// Node is this node's name (internalTrafficPolicy Local keeps the endpoints on it).
	Node string
	// MaxRules bounds the cluster table (services plus real servers); 0: no limit.
	MaxRules int
	// ProbeEvery is how often the API server's reachability is checked for the status
	// (GET /version); 0: every 5 s. The informers' watches do not depend on it.
	ProbeEvery time.Duration
	Logger     *slog.Logger
}

// Status is the Syncer's state, for `kata-dp status`, /readyz and the metrics.
type Status struct {
	Node string `json:"node"`
	// Synced: the informers listed everything once and the first table was written.
	Synced   bool      `json:"synced"`
	LastSync time.Time `json:"lastSync,omitzero"`
	// SyncLag is how long the last change took from the informer's event to every sandbox's
	// datapath; MaxSyncLag the longest since the start.
	SyncLag    time.Duration `json:"syncLag"`
	MaxSyncLag time.Duration `json:"maxSyncLag"`
	// Connected: the last probe of the API server answered.
	Connected   bool      `json:"connected"`
	LastContact time.Time `json:"lastContact,omitzero"`
	LastError   string    `json:"lastError,omitempty"`
	LastErrorAt time.Time `json:"lastErrorAt,omitzero"`
	// Objects seen in the informers' caches.
	Services       int `json:"services"`
	EndpointSlices int `json:"endpointSlices"`
	// The cluster table: virtual services and rules (services plus real servers).
	VirtualServices int `json:"virtualServices"`
	Rules           int `json:"rules"`
	MaxRules        int `json:"maxRules"`
	// Errors counts failed syncs and watch errors since the start.
	Errors uint64 `json:"errors"`
	// Skipped lists, by Service, what was not programmed and why.
	Skipped map[string][]string `json:"skipped,omitempty"`
}

// Syncer follows the API server and keeps the Target's cluster table in step.
type Syncer struct {
	o       Options
	target  Target
	table   *Table // owned by Run's goroutine
	log     *slog.Logger
	kick    chan struct{}
	svcs    cache.SharedIndexInformer
	slices  cache.SharedIndexInformer
	version *http.Client // probes GET /version

	mu    sync.Mutex
	dirty map[string]time.Time // namespace/name of Services to translate again -> first event
	st    Status
}

const serviceIndex = "service"

// New returns a Syncer for target; Run starts it.
func New(target Target, o Options) (*Syncer, error) {
	if o.Config == nil {
		return nil, errors.New("kubernetes: no client configuration")
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	if o.ProbeEvery <= 0 {
		o.ProbeEvery = 5 * time.Second
	}
	dyn, err := dynamic.NewForConfig(o.Config)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	hc, err := rest.HTTPClientFor(o.Config)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	s := &Syncer{o: o, target: target, table: NewTable(o.MaxRules), log: o.Logger, kick: make(chan struct{}, 1),
		dirty: map[string]time.Time{}, st: Status{Node: o.Node, MaxRules: o.MaxRules}, version: hc}
	s.svcs = informer(dyn, corev1.SchemeGroupVersion.WithResource("services"), toTyped[corev1.Service])
	s.slices = informer(dyn, discoveryv1.SchemeGroupVersion.WithResource("endpointslices"), toTyped[discoveryv1.EndpointSlice])
	s.slices.AddIndexers(cache.Indexers{serviceIndex: func(obj any) ([]string, error) {
		if name := sliceService(obj); name != "" {
			return []string{name}, nil
		}
		return nil, nil
	}})
	s.svcs.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { s.mark(serviceKey(obj)) },
		UpdateFunc: func(_, obj any) { s.mark(serviceKey(obj)) },
		DeleteFunc: func(obj any) { s.mark(serviceKey(obj)) },
	})
	s.slices.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(obj any) { s.mark(sliceService(obj)) },
		UpdateFunc: func(old, obj any) {
			s.mark(sliceService(old))
			s.mark(sliceService(obj))
		},
		DeleteFunc: func(obj any) { s.mark(sliceService(obj)) },
	})
	for _, inf := range []cache.SharedIndexInformer{s.svcs, s.slices} {
		inf.SetWatchErrorHandler(func(r *cache.Reflector, err error) {
			s.noteErr(fmt.Errorf("watch: %w", err))
			s.mu.Lock()
			s.st.Connected = false
			s.mu.Unlock()
			s.log.Warn("kubernetes: watch failed; client-go retries with backoff, the datapath keeps the last state", "err", err)
		})
	}
	return s, nil
}

// informer watches one resource in every namespace, without periodic resync: the watches
// deliver every change, and a relist after a lost watch delivers every object again, which the
// table compares before writing anything. It lists and watches through the dynamic client and
// converts each object to its typed form before it is stored: client-go's typed clientset and
// informer factory link every API group's types and register them all at process start (about
// 12 ms and 30 MB more for every kata-dp process, the kata-network / kata-ipvs CLI's included),
// where these two resources are all the agent reads.
func informer(dyn dynamic.Interface, gvr schema.GroupVersionResource, typed cache.TransformFunc) cache.SharedIndexInformer {
	ri := dyn.Resource(gvr)
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			return ri.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			return ri.Watch(ctx, o)
		},
	}
	inf := cache.NewSharedIndexInformer(lw, &unstructured.Unstructured{}, 0, cache.Indexers{})
	_ = inf.SetTransform(typed) // fails only once the informer runs
	return inf
}

// toTyped converts an object the dynamic client decoded into *T (a transform: objects already
// converted pass unchanged).
func toTyped[T any](obj any) (any, error) {
	u, ok := obj.(*unstructured.Unstructured)
	if !ok {
		return obj, nil
	}
	t := new(T)
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.UnstructuredContent(), t); err != nil {
		return nil, fmt.Errorf("kubernetes: decode %s %s/%s: %w", u.GetKind(), u.GetNamespace(), u.GetName(), err)
	}
	return t, nil
}

func serviceKey(obj any) string {
	k, err := cache.DeletionHandlingMetaNamespaceKeyFunc(obj)
	if err != nil {
		return ""
	}
	return k
}

// sliceService returns namespace/name of the Service an EndpointSlice belongs to ("" for a
// slice without the kubernetes.io/service-name label).
func sliceService(obj any) string {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	sl, ok := obj.(*discoveryv1.EndpointSlice)
	if !ok {
		return ""
	}
	name := sl.Labels[discoveryv1.LabelServiceName]
	if name == "" {
		return ""
	}
	return sl.Namespace + "/" + name
}

func (s *Syncer) mark(name string) {
	if name == "" {
		return
	}
	s.mu.Lock()
	if _, ok := s.dirty[name]; !ok {
		s.dirty[name] = time.Now()
	}
	s.mu.Unlock()
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

func (s *Syncer) noteErr(err error) {
	s.mu.Lock()
	s.st.Errors++
	s.st.LastError = err.Error()
	s.st.LastErrorAt = time.Now()
	s.mu.Unlock()
}

// Status returns the Syncer's state.
func (s *Syncer) Status() Status {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.Skipped = maps.Clone(s.st.Skipped)
	return st
}

// Ready returns nil once the first sync is done, or says what is awaited (for /readyz).
// Losing the API server later does not make the node unready: the datapath keeps serving the
// last state (the status and the metrics say so).
func (s *Syncer) Ready(context.Context) error {
	st := s.Status()
	if st.Synced {
		return nil
	}
	if st.LastError != "" {
		return fmt.Errorf("not yet: first sync of Services and EndpointSlices (last error: %s)", st.LastError)
	}
	return errors.New("not yet: first sync of Services and EndpointSlices")
}

// Run starts the informers, writes the first table once their caches are filled, and then
// every change, until ctx ends. It returns ctx's error.
func (s *Syncer) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	ictx, stop := context.WithCancel(ctx)
	defer func() { stop(); wg.Wait() }()
	for _, inf := range []cache.SharedIndexInformer{s.svcs, s.slices} {
		wg.Go(func() { inf.RunWithContext(ictx) })
	}
	go s.probe(ctx)
	s.log.Info("kubernetes: watching Services and EndpointSlices", "node", s.o.Node)
	if !cache.WaitForCacheSync(ctx.Done(), s.svcs.HasSynced, s.slices.HasSynced) {
		return ctx.Err()
	}
	first := true
	for {
		if err := s.syncOnce(ctx, first); err != nil {
			s.noteErr(err)
			s.log.Error("kubernetes: sync", "err", err)
		}
		first = false
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.kick:
		}
	}
}

// syncOnce translates the Services marked since the last call and hands the changes to the
// target (always on the first call, which releases the datapath held since the start).
func (s *Syncer) syncOnce(ctx context.Context, first bool) error {
	s.mu.Lock()
	dirty := s.dirty
	s.dirty = map[string]time.Time{}
	s.mu.Unlock()
	var changed []ipvs.ServiceKey
	var errs []error
	oldest := time.Time{}
	names := slices.Sorted(maps.Keys(dirty))
	for _, name := range names {
		if t := dirty[name]; oldest.IsZero() || t.Before(oldest) {
			oldest = t
		}
		tr := s.translate(name)
		c, err := s.table.Update(name, tr)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		changed = append(changed, c...)
	}
	if len(changed) > 0 || first {
		if err := s.target.SetCluster(ctx, s.table.Snapshot(), changed); err != nil {
			errs = append(errs, err)
		}
	}
	now := time.Now()
	s.mu.Lock()
	s.st.Services = len(s.svcs.GetStore().ListKeys())
	s.st.EndpointSlices = len(s.slices.GetStore().ListKeys())
	s.st.VirtualServices = s.table.Len()
	s.st.Rules = s.table.Rules()
	s.st.Skipped = s.table.Skipped()
	if len(changed) > 0 || first {
		s.st.LastSync = now
		if !oldest.IsZero() {
			s.st.SyncLag = now.Sub(oldest)
			s.st.MaxSyncLag = max(s.st.MaxSyncLag, s.st.SyncLag)
		}
	}
	if first {
		s.st.Synced = true
		s.log.Info("kubernetes: first sync done", "services", s.st.Services, "virtualServices", s.st.VirtualServices, "rules", s.st.Rules, "took", s.st.SyncLag)
	}
	s.mu.Unlock()
	return errors.Join(errs...)
}

// translate translates the Service name (namespace/name) from the informers' caches; a
// Service that is gone translates to nothing.
func (s *Syncer) translate(name string) Translation {
	obj, ok, err := s.svcs.GetIndexer().GetByKey(name)
	if err != nil || !ok {
		return Translation{}
	}
	svc, ok := obj.(*corev1.Service)
	if !ok {
		return Translation{}
	}
	objs, _ := s.slices.GetIndexer().ByIndex(serviceIndex, name)
	eps := make([]*discoveryv1.EndpointSlice, 0, len(objs))
	for _, o := range objs {
		if sl, ok := o.(*discoveryv1.EndpointSlice); ok {
			eps = append(eps, sl)
		}
	}
	return Translate(svc, eps, s.o.Node)
}

// probe checks the API server's reachability every ProbeEvery for the status.
// get GETs path on the API server and wants 200.
func (s *Syncer) get(ctx context.Context, path string) error {
	base, _, err := rest.DefaultServerUrlFor(s.o.Config)
	if err != nil {
		return err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, base.JoinPath(path).String(), nil)
	if err != nil {
		return err
	}
	resp, err := s.version.Do(req)
	if err != nil {
		return err
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return nil
}

func (s *Syncer) probe(ctx context.Context) {
	tick := time.NewTicker(s.o.ProbeEvery)
	defer tick.Stop()
	for {
		pctx, cancel := context.WithTimeout(ctx, max(s.o.ProbeEvery, time.Second))
		err := s.get(pctx, "/version")
		cancel()
		if ctx.Err() != nil {
			return
		}
		s.mu.Lock()
		if err == nil {
			s.st.Connected = true
			s.st.LastContact = time.Now()
		} else {
			s.st.Connected = false
		}
		s.mu.Unlock()
		if err != nil {
			s.noteErr(fmt.Errorf("API server: %w", err))
		}
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}
