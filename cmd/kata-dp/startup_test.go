package main

import (
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// TestStartupDeps keeps packages that cost every kata-dp process at start out of the binary:
// the kata-network / kata-ipvs CLI is one process per runtime call. client-go's typed clientset
// and informer factory register every API group in package init (12 ms and 18 MB more, measured
// with GODEBUG=inittrace=1); control/kube reads its two resources through the dynamic client.
// gonum/plot parsed its fonts at every start (2-3 ms, 7 MB of the binary); `kata-dp bench
// --charts` writes its SVG itself.
func TestStartupDeps(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	out, err := exec.Command(goBin, "list", "-deps", ".").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v\n%s", err, out)
	}
	for _, pkg := range strings.Fields(string(out)) {
		switch {
		case pkg == "k8s.io/client-go/kubernetes", pkg == "k8s.io/client-go/kubernetes/scheme",
			pkg == "k8s.io/client-go/informers":
			t.Errorf("kata-dp links %s (every API group registered at every start)", pkg)
		case strings.HasPrefix(pkg, "gonum.org/v1/plot"), strings.HasPrefix(pkg, "codeberg.org/go-fonts/"):
			t.Errorf("kata-dp links %s (fonts parsed at every start)", pkg)
		}
	}
}
