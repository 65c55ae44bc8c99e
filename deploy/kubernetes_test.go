package deploy

import (
	"bufio"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"sigs.k8s.io/yaml"

	"github.com/kata-dp/kata-dp/control/api"
	"github.com/kata-dp/kata-dp/control/store"
	"github.com/kata-dp/kata-dp/loader"
)

// cniBinDir is where the CNI runtime looks for plugins by default (and `make install` puts
// kata-dp-cni unless CNI_BIN_DIR says otherwise).
const cniBinDir = "/opt/cni/bin"

// rbac is the manifests' RBAC objects.
type rbac struct {
	roles    []*rbacv1.ClusterRole
	bindings []*rbacv1.ClusterRoleBinding
}

// manifests decodes every document of every file in kubernetes/ strictly (unknown or misspelt
// fields refused) into the real API type of its kind.
func manifests(t *testing.T) (ds *appsv1.DaemonSet, cm *corev1.ConfigMap, sa *corev1.ServiceAccount) {
	ds, cm, sa, _ = manifestsWithRBAC(t)
	return ds, cm, sa
}

func manifestsWithRBAC(t *testing.T) (ds *appsv1.DaemonSet, cm *corev1.ConfigMap, sa *corev1.ServiceAccount, rb rbac) {
	t.Helper()
	files, err := filepath.Glob("kubernetes/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests: %v", err)
	}
	type doc struct {
		file string
		b    []byte
	}
	var docs []doc
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, part := range strings.Split(string(b), "\n---\n") {
			docs = append(docs, doc{f, []byte(part)})
		}
	}
	for _, d := range docs {
		f, b := d.file, d.b
		var meta struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(b, &meta); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		var obj any
		switch meta.APIVersion + " " + meta.Kind {
		case "apps/v1 DaemonSet":
			ds = &appsv1.DaemonSet{}
			obj = ds
		case "v1 ConfigMap":
			cm = &corev1.ConfigMap{}
			obj = cm
		case "v1 ServiceAccount":
			sa = &corev1.ServiceAccount{}
			obj = sa
		case "v1 Namespace":
			obj = &corev1.Namespace{}
		case "rbac.authorization.k8s.io/v1 ClusterRole":
			r := &rbacv1.ClusterRole{}
			rb.roles = append(rb.roles, r)
			obj = r
		case "rbac.authorization.k8s.io/v1 ClusterRoleBinding":
			r := &rbacv1.ClusterRoleBinding{}
			rb.bindings = append(rb.bindings, r)
			obj = r
		default:
			t.Fatalf("%s: unexpected %s %s", f, meta.APIVersion, meta.Kind)
		}
		if err := yaml.UnmarshalStrict(b, obj); err != nil {
			t.Errorf("%s: %v", f, err)
		}
	}
	if ds == nil || cm == nil || sa == nil {
		t.Fatalf("want a DaemonSet, a ConfigMap and a ServiceAccount: %v", files)
	}
	return ds, cm, sa, rb
}

// TestKubernetesRBAC: the DaemonSet's ServiceAccount is bound to a ClusterRole that lets it
// get, list and watch Services, EndpointSlices and Nodes (what control/kube's informers and
// the node name need) and nothing else; its token is mounted; the agent follows the cluster
// in-cluster and gets the node's name from the pod spec.
func TestKubernetesRBAC(t *testing.T) {
	ds, cm, sa, rb := manifestsWithRBAC(t)
	spec := ds.Spec.Template.Spec
	if spec.AutomountServiceAccountToken != nil && !*spec.AutomountServiceAccountToken ||
		sa.AutomountServiceAccountToken != nil && !*sa.AutomountServiceAccountToken {
		t.Errorf("the ServiceAccount's token is not mounted: the agent cannot watch the API server")
	}
	want := map[string]bool{"/services": true, "/nodes": true, "discovery.k8s.io/endpointslices": true}
	var bound []string
	for _, b := range rb.bindings {
		bindsSA := slices.ContainsFunc(b.Subjects, func(s rbacv1.Subject) bool {
			return s.Kind == "ServiceAccount" && s.Name == sa.Name && s.Namespace == sa.Namespace
		})
		if !bindsSA || b.RoleRef.Kind != "ClusterRole" {
			continue
		}
		for _, r := range rb.roles {
			if r.Name != b.RoleRef.Name {
				continue
			}
			for _, rule := range r.Rules {
				verbs := slices.Sorted(slices.Values(rule.Verbs))
				if !slices.Equal(verbs, []string{"get", "list", "watch"}) {
					t.Errorf("ClusterRole %s: verbs %v, want get, list, watch only", r.Name, rule.Verbs)
				}
				for _, g := range rule.APIGroups {
					for _, res := range rule.Resources {
						if !want[g+"/"+res] {
							t.Errorf("ClusterRole %s grants %s/%s, which the agent does not use", r.Name, g, res)
						}
						bound = append(bound, g+"/"+res)
					}
				}
			}
		}
	}
	for res := range want {
		if !slices.Contains(bound, res) {
			t.Errorf("the ServiceAccount %s/%s cannot get/list/watch %s", sa.Namespace, sa.Name, res)
		}
	}
	var cfg map[string]string
	if err := yaml.Unmarshal([]byte(cm.Data["config.yaml"]), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg["kube-in-cluster"] != "true" {
		t.Errorf("ConfigMap config.yaml: kube-in-cluster %q, want true", cfg["kube-in-cluster"])
	}
	agent := spec.Containers[0]
	i := slices.Index(agent.Command, "--node-name")
	if i < 0 || i+1 >= len(agent.Command) || agent.Command[i+1] != "$(NODE_NAME)" {
		t.Fatalf("agent command %v: want --node-name $(NODE_NAME)", agent.Command)
	}
	if !slices.ContainsFunc(agent.Env, func(e corev1.EnvVar) bool {
		return e.Name == "NODE_NAME" && e.ValueFrom != nil && e.ValueFrom.FieldRef != nil && e.ValueFrom.FieldRef.FieldPath == "spec.nodeName"
	}) {
		t.Errorf("NODE_NAME is not the pod's spec.nodeName: %+v", agent.Env)
	}
}

// TestKubernetesManifests: the manifests decode strictly, and the DaemonSet mounts every host
// path the agent uses (its default socket dir, state dir and bpffs root, /run/netns, /run/vc)
// at the same path as on the host, installs kata-dp-cni into the node's CNI bin dir, runs the
// image's binaries and reads the ConfigMap's config at the paths it mounts.
func TestKubernetesManifests(t *testing.T) {
	ds, cm, sa := manifests(t)
	spec := ds.Spec.Template.Spec
	if !spec.HostNetwork || !spec.HostPID || spec.ServiceAccountName != sa.Name || sa.Namespace != ds.Namespace {
		t.Errorf("pod spec: hostNetwork %v hostPID %v serviceAccount %q (want %q in %s)", spec.HostNetwork, spec.HostPID,
			spec.ServiceAccountName, sa.Name, ds.Namespace)
	}
	if sel := ds.Spec.Selector.MatchLabels; len(sel) == 0 || !labelsMatch(sel, ds.Spec.Template.Labels) {
		t.Errorf("selector %v does not select the template's labels %v", sel, ds.Spec.Template.Labels)
	}
	hostPaths := map[string]string{} // volume -> host path
	for _, v := range spec.Volumes {
		if v.HostPath != nil {
			hostPaths[v.Name] = v.HostPath.Path
		}
		if v.ConfigMap != nil && v.ConfigMap.Name != cm.Name {
			t.Errorf("volume %s: ConfigMap %q, the manifest's is %q", v.Name, v.ConfigMap.Name, cm.Name)
		}
	}
	if len(spec.Containers) != 1 || len(spec.InitContainers) != 1 {
		t.Fatalf("want one agent and one init container: %d, %d", len(spec.Containers), len(spec.InitContainers))
	}
	agent := spec.Containers[0]
	mounts := map[string]string{} // container path -> host path
	for _, m := range agent.VolumeMounts {
		hp, ok := hostPaths[m.Name]
		if !ok {
			continue
		}
		if hp != m.MountPath {
			t.Errorf("agent mount %s: host %s at %s: paths the runtime passes would not resolve", m.Name, hp, m.MountPath)
		}
		mounts[m.MountPath] = hp
	}
	covered := func(p string) bool {
		for mp := range mounts {
			if p == mp || strings.HasPrefix(p, mp+"/") {
				return true
			}
		}
		return false
	}
	// The config the agent runs with: the ConfigMap's file, which the command names.
	cfgText, ok := cm.Data["config.yaml"]
	if !ok {
		t.Fatalf("ConfigMap %s has no config.yaml: %v", cm.Name, cm.Data)
	}
	var cfg map[string]string
	if err := yaml.UnmarshalStrict([]byte(cfgText), &cfg); err != nil {
		t.Fatalf("ConfigMap config.yaml: %v", err)
	}
	if i := slices.Index(agent.Command, "--config"); i < 0 || i+1 >= len(agent.Command) || !configMounted(agent, agent.Command[i+1]) {
		t.Errorf("agent command %v does not read the mounted ConfigMap", agent.Command)
	}
	for _, want := range []struct{ key, def string }{
		{"socket", api.DefaultSocket}, {"state-dir", store.DefaultDir}, {"bpffs-root", loader.DefaultRoot},
	} {
		p := cfg[want.key]
		if p == "" {
			p = want.def
		}
		if p != want.def {
			t.Errorf("config %s: %q, the agent's default is %q (keep the node layout the docs describe)", want.key, p, want.def)
		}
		if !covered(p) {
			t.Errorf("%s %s is not on a host mount of the agent: %v", want.key, p, mounts)
		}
	}
	for _, p := range []string{path.Dir(api.DefaultSocket), "/run/netns", "/run/vc"} {
		if _, ok := mounts[p]; !ok {
			t.Errorf("%s not mounted from the host: %v", p, mounts)
		}
	}
	// The init container installs the plugin from the image into the host's CNI bin dir.
	initc := spec.InitContainers[0]
	if len(initc.Command) != 3 || initc.Command[1] != "--install" {
		t.Fatalf("init container command: %v", initc.Command)
	}
	dir := initc.Command[2]
	found := false
	for _, m := range initc.VolumeMounts {
		if m.MountPath == dir && hostPaths[m.Name] == cniBinDir {
			found = true
		}
	}
	if !found {
		t.Errorf("init container installs into %s, which is not the host's %s", dir, cniBinDir)
	}
	// The image has the binaries where the manifests run them.
	copies := dockerCopies(t)
	for _, bin := range []string{agent.Command[0], initc.Command[0]} {
		if !slices.Contains(copies, bin) {
			t.Errorf("%s is not in the image (Dockerfile copies %v)", bin, copies)
		}
	}
}

func labelsMatch(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// configMounted says the path is a file of a ConfigMap volume mounted into c.
func configMounted(c corev1.Container, p string) bool {
	for _, m := range c.VolumeMounts {
		if path.Dir(p) == m.MountPath && m.Name == "config" {
			return true
		}
	}
	return false
}

// dockerCopies returns the destinations of the final stage's COPY lines in the Dockerfile,
// checking that every COPY from the build context names a file that exists.
func dockerCopies(t *testing.T) []string {
	t.Helper()
	f, err := os.Open("Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var dsts []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) == 0 {
			continue
		}
		if fields[0] == "FROM" {
			dsts = nil // only the final stage counts
		}
		if fields[0] != "COPY" || len(fields) < 3 {
			continue
		}
		src := fields[len(fields)-2]
		if !strings.HasPrefix(fields[1], "--from=") && src != "." && !strings.HasSuffix(src, ".") {
			for _, s := range fields[1 : len(fields)-1] {
				if _, err := os.Stat(filepath.Join("..", s)); err != nil {
					t.Errorf("Dockerfile: COPY %s: %v", s, err)
				}
			}
		}
		dsts = append(dsts, fields[len(fields)-1])
	}
	return dsts
}
