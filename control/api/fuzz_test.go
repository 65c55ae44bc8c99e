package api

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sync"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/netspec"
)

// memStore is a StateStore in memory.
type memStore struct {
	mu sync.Mutex
	m  map[string][]byte
}

func (s *memStore) Put(k string, b []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m[k] = append([]byte(nil), b...)
	return nil
}

func (s *memStore) Delete(k string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, k)
	return nil
}

func (s *memStore) Load() (map[string][]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return maps.Clone(s.m), nil
}

// FuzzKataNetwork runs sequences of kata-network operations with arbitrary input through the
// controller: no panic, stdout is empty, null or JSON, and control's state, the dataplane and
// the taps agree after every step.
func FuzzKataNetwork(f *testing.F) {
	f.Add(uint8(0), []byte(`{"device":"tap-test","name":"eth-test","IPAddresses":[{"address":"172.16.0.3","mask":"16"}],"hwAddr":"02:42:20:6f:a3:69","mtu":1500,"queues":5}`),
		uint8(4), []byte(`{"dest":"default","gateway":"172.16.0.1","device":"eth-test"}`))
	f.Add(uint8(0), []byte(`{"device":"t1","name":"n1","hwAddr":"02:00:00:00:00:01","mtu":1500,"uplink":"eth0"}`),
		uint8(1), []byte(`{"name":"n1"}`))
	f.Add(uint8(0), []byte(`{"device":"t1","name":"n1","hwAddr":"02:00:00:00:00:01","mtu":1500}`),
		uint8(2), []byte(`{"name":"n1","IPAddresses":[{"address":"10.0.0.1","mask":"8"}]}`))
	f.Add(uint8(0), []byte(`{"device":"t1","name":"n1","hwAddr":"02:00:00:00:00:01","mtu":1500}`),
		uint8(6), []byte(`[{"dest":"10.0.0.0/8","device":"n1"},{"dest":"1.1.1.1","device":"lo"}]`))
	f.Add(uint8(4), []byte(`{"dest":"1.1.1.1","device":"lo"}`), uint8(5), []byte(`{"dest":"1.1.1.1"}`))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	f.Fuzz(func(t *testing.T, op1 uint8, in1 []byte, op2 uint8, in2 []byte) {
		taps := controltest.NewMemTaps()
		taps.AddLink("/ns", "eth0", false)
		dp := controltest.NewMemDataplane()
		c, err := control.New(context.Background(), control.Config{Dataplane: dp, Taps: taps, Store: &memStore{m: map[string][]byte{}},
			Hotplug: controltest.NewMemHotplugger(), CheckNetNS: func(string) error { return nil }, CheckVhostSocket: func(string) error { return nil }, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.AddSandbox(context.Background(), control.SandboxSpec{ID: "sb", NetNS: "/ns", QMP: "/qmp"}); err != nil {
			t.Fatal(err)
		}
		for _, step := range []struct {
			op uint8
			in []byte
		}{{op1, in1}, {op2, in2}} {
			op := Ops[int(step.op)%len(Ops)]
			out, _ := KataNetwork(context.Background(), c, "sb", op, step.in)
			if len(out) > 0 && !json.Valid(out) {
				t.Fatalf("%s printed %q", op, out)
			}
			ifaces, _ := c.Ifaces(context.Background(), "sb")
			eps := dp.Sandbox("sb").Endpoints
			if len(ifaces) != len(eps) {
				t.Fatalf("%s: %d NICs but %d endpoints", op, len(ifaces), len(eps))
			}
			for _, n := range ifaces {
				if _, ok := taps.Links("/ns")[n.Device]; !ok {
					t.Fatalf("%s: tap %s of NIC %s missing", op, n.Device, n.Name)
				}
			}
			routes, _ := c.Routes(context.Background(), "sb")
			if got := programmable(ifaces, routes); got != len(dp.Sandbox("sb").Routes) || got > len(routes) {
				t.Fatalf("%s: %d programmable routes, dataplane holds %d", op, got, len(dp.Sandbox("sb").Routes))
			}
		}
	})
}

// programmable counts the routes the dataplane holds: IPv4 routes on a NIC (not on "lo").
func programmable(ifaces []netspec.Interface, routes []netspec.Route) int {
	n := 0
	for _, r := range routes {
		pr, err := netspec.ValidateRoute(r)
		if err == nil && pr.Dest.Addr().Is4() && slices.ContainsFunc(ifaces, func(i netspec.Interface) bool { return i.Name == r.Device }) {
			n++
		}
	}
	return n
}
