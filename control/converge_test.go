package control_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/netspec"
	"github.com/kata-dp/kata-dp/control/store"
	"github.com/kata-dp/kata-dp/internal/faultinject"
)

// world is what outlives an agent process: the saved state, the dataplane's pins, the taps and
// the VM. A "restart" builds a new Controller over the same world.
type world struct {
	dir  string
	dp   *controltest.MemDataplane
	taps *controltest.MemTaps
	hp   *controltest.MemHotplugger
}

func newWorld(t *testing.T) *world {
	w := &world{dir: t.TempDir(), dp: controltest.NewMemDataplane(), taps: controltest.NewMemTaps(), hp: controltest.NewMemHotplugger()}
	w.taps.AddLink(testNS, "eth0", false)
	return w
}

// killed is what the fault hook panics with: the in-process stand-in for SIGKILL (nothing
// the dead controller holds in memory is used again; deferred unlocks do not matter).
type killed struct{ step string }

// start builds a controller over w, as an agent start does; a kill during the start (a
// recovery step) starts it again.
func (w *world) start(t *testing.T) *control.Controller {
	t.Helper()
	for {
		var c *control.Controller
		died := crashes(func() {
			s, err := store.Open(w.dir)
			if err != nil {
				t.Fatal(err)
			}
			c, err = control.New(context.Background(), control.Config{Dataplane: w.dp, Taps: w.taps, Store: s, Hotplug: w.hp,
				CheckNetNS: func(p string) error {
					if p != testNS {
						return errors.New("no such file or directory")
					}
					return nil
				},
				Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
			if err != nil {
				t.Fatal(err)
			}
		})
		if !died {
			return c
		}
	}
}

// crashes runs f and reports whether the fault hook killed it.
func crashes(f func()) (died bool) {
	defer func() {
		if r := recover(); r != nil {
			if _, ok := r.(killed); !ok {
				panic(r)
			}
			died = true
		}
	}()
	f()
	return false
}

// snapshot is everything of the world a test compares, plus what the agent reports.
func (w *world) snapshot(c *control.Controller) string {
	var b strings.Builder
	if sb := w.dp.Sandbox("conv1"); sb != nil {
		fmt.Fprintf(&b, "dataplane: endpoints %v routes %v\n", sb.Endpoints, sb.Routes)
	} else {
		b.WriteString("dataplane: none\n")
	}
	links := w.taps.Links(testNS)
	fmt.Fprintf(&b, "links: %v\nvm: %v\n", slices.Sorted(func(yield func(string) bool) {
		for k := range links {
			if !yield(k) {
				return
			}
		}
	}), w.hp.Plugged("conv1"))
	s, _ := store.Open(w.dir)
	keys, _ := s.Keys()
	fmt.Fprintf(&b, "state keys: %v\n", keys)
	if ifs, err := c.Ifaces(context.Background(), "conv1"); err == nil {
		rs, _ := c.Routes(context.Background(), "conv1")
		j, _ := json.Marshal(ifs)
		fmt.Fprintf(&b, "ifaces: %s\nroutes: %+v\n", j, rs)
	}
	return b.String()
}

// convergeScript is the life of a sandbox, one agent operation per step.
var convergeScript = []struct {
	name string
	run  func(c *control.Controller) error
}{
	{"sandbox add", func(c *control.Controller) error {
		_, err := c.AddSandbox(context.Background(), control.SandboxSpec{ID: "conv1", NetNS: testNS, QMP: "/run/q.sock"})
		return err
	}},
	{"add-iface", func(c *control.Controller) error {
		_, err := c.AddIface(context.Background(), "conv1", netspec.AddRequest{Interface: netspec.Interface{Device: "tap0", Name: "eth-t",
			HwAddr: "02:00:00:00:00:01", MTU: 1500, IPAddresses: []*netspec.IPAddress{{Address: "10.0.0.2", Mask: "24"}}}})
		return err
	}},
	{"add-route", func(c *control.Controller) error {
		_, err := c.AddRoute(context.Background(), "conv1", netspec.Route{Dest: "default", Gateway: "10.0.0.1", Device: "eth-t"})
		return err
	}},
	{"del-iface", func(c *control.Controller) error {
		return c.DelIface(context.Background(), "conv1", netspec.Interface{Name: "eth-t"})
	}},
	{"sandbox del", func(c *control.Controller) error {
		return c.DelSandbox(context.Background(), "conv1")
	}},
}

// TestKillAtEveryStepConverges kills the agent (in process: the fault hook panics, the
// controller is abandoned and a new one started over the same saved state, pins, taps and VM)
// at every step of sandbox add, add-iface, del-iface and sandbox del in turn, and at the
// recovery steps of the restart after it; then retries the operation. After each operation
// the world must be what a run without kills has, and at the end nothing is left.
func TestKillAtEveryStepConverges(t *testing.T) {
	clean := newWorld(t)
	c := clean.start(t)
	var want []string
	for _, op := range convergeScript {
		if err := op.run(c); err != nil {
			t.Fatalf("clean run: %s: %v", op.name, err)
		}
		want = append(want, clean.snapshot(c))
	}
	var reached []string
	faultinject.Hook = func(s string) { reached = append(reached, s) }
	t.Cleanup(func() { faultinject.Hook = nil })
	w := newWorld(t)
	c = w.start(t)
	for _, op := range convergeScript {
		if err := op.run(c); err != nil {
			t.Fatal(err)
		}
	}
	faultinject.Hook = nil
	steps := slices.Compact(reached)
	if len(steps) < 10 {
		t.Fatalf("fault points reached: %v", steps)
	}

	for _, step := range steps {
		for _, then := range []string{"", "recover:unplug", "recover:removed"} {
			name := step
			if then != "" {
				name += "+" + then
			}
			t.Run(name, func(t *testing.T) {
				w := newWorld(t)
				c := w.start(t)
				for i, op := range convergeScript {
					fired := ""
					faultinject.Hook = func(s string) {
						if fired == "" && s == step {
							fired = s
							panic(killed{s})
						}
					}
					died := crashes(func() {
						if err := op.run(c); err != nil {
							t.Fatalf("%s: %v", op.name, err)
						}
					})
					faultinject.Hook = nil
					if died {
						// Restart; a kill during the restart's recovery restarts it again.
						recovered := false
						faultinject.Hook = func(s string) {
							if then != "" && s == then && !recovered {
								recovered = true
								panic(killed{s})
							}
						}
						c = w.start(t)
						faultinject.Hook = nil
						// The restart finished an interrupted sandbox delete by itself: the
						// retry finds nothing to delete.
						if err := op.run(c); err != nil && !(op.name == "sandbox del" && errors.Is(err, control.ErrNoSuchSandbox)) {
							t.Fatalf("%s retried after a kill at %s: %v", op.name, step, err)
						}
					}
					if d := cmp.Diff(want[i], w.snapshot(c)); d != "" {
						t.Fatalf("after %s (killed at %s: %v) (-clean run +this run):\n%s", op.name, step, died, d)
					}
				}
			})
		}
	}
}
