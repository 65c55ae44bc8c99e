package main

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
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

// TestStartupInit keeps kata-dp's own package-level work small. Every kata-dp process, so every
// kata-network and kata-ipvs call of the runtime, runs the init of every package the binary
// links before main: regular expressions, tables and lists made at package level are paid at
// every start whether the command uses them or not (a bounded repetition in control/store's
// key pattern made 2600 allocations, control/ipvs's option tokens 256, bench's mode list
// formatted every row's description). Such work is made on first use instead (sync.OnceValue,
// or a check written out). Counted in allocations (GODEBUG=inittrace=1), which do not depend
// on the machine's load as the time does.
func TestStartupInit(t *testing.T) {
	const perPackage, total = 200, 600 // now: control/metrics 159 (prometheus descriptors), 480 in all (this test binary)
	cmd := exec.Command(os.Args[0], "--version")
	cmd.Env = append(os.Environ(), "KDP_TEST_MAIN=1", "GODEBUG=inittrace=1")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("kata-dp --version: %v\n%s", err, stderr.Bytes())
	}
	sum, seen := 0, 0
	sc := bufio.NewScanner(bytes.NewReader(stderr.Bytes()))
	for sc.Scan() {
		// init github.com/kata-dp/kata-dp/control/store @10 ms, 0.32 ms clock, 12112 bytes, 45 allocs
		f := strings.Fields(sc.Text())
		if len(f) != 11 || f[0] != "init" || f[10] != "allocs" || !strings.HasPrefix(f[1], "github.com/kata-dp/kata-dp/") {
			continue
		}
		n, err := strconv.Atoi(f[9])
		if err != nil {
			t.Fatalf("inittrace line %q: %v", sc.Text(), err)
		}
		seen++
		sum += n
		if n > perPackage {
			t.Errorf("%s allocates %d times at init (budget %d): make its package-level work lazy", f[1], n, perPackage)
		}
	}
	if seen == 0 {
		t.Fatalf("no init of a kata-dp package in the inittrace output:\n%s", stderr.Bytes())
	}
	if sum > total {
		t.Errorf("kata-dp's packages allocate %d times at init (budget %d)", sum, total)
	}
	t.Logf("%d kata-dp packages with init work, %d allocations", seen, sum)
}
