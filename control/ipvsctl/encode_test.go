package ipvsctl

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/control/ipvs"
)

// TestEncodeSnapshot: the hand-written encoding of a saved table is json.Marshal's, byte for
// byte, for tables made by restores (both families, every scheduler, persistence) and for the
// odd shapes only a hand-made table has (nil slices, nil services, zero addresses, strings
// encoding/json escapes).
func TestEncodeSnapshot(t *testing.T) {
	var rules strings.Builder
	scheds := []string{"rr", "wrr", "lc", "wlc", "sh", "dh", "sed", "nq", "lblc", "lblcr"}
	for i := range 300 {
		proto := "-t"
		if i%3 == 1 {
			proto = "-u"
		}
		svc := fmt.Sprintf("10.%d.%d.%d:%d", i/65536, (i/256)%256, i%256, 80+i%7)
		if i%4 == 3 {
			svc = fmt.Sprintf("[fd00::%x]:%d", i, 443)
		}
		opts := ""
		if i%5 == 0 {
			opts = fmt.Sprintf(" -p %d", 60+i)
			if !strings.HasPrefix(svc, "[") {
				opts += " -M 255.255.255.0"
			}
		}
		fmt.Fprintf(&rules, "-A %s %s -s %s%s\n", proto, svc, scheds[i%len(scheds)], opts)
		for j := range i % 4 {
			rs := fmt.Sprintf("172.16.%d.%d:8080", j, i%250+1)
			if strings.HasPrefix(svc, "[") {
				rs = fmt.Sprintf("[fd01::%x:%x]:8443", i, j)
			}
			fmt.Fprintf(&rules, "-a %s %s -r %s -m -w %d\n", proto, svc, rs, (i*7+j)%70000%65536)
		}
	}
	cmds, err := ipvs.ParseRestore(strings.NewReader(rules.String()))
	if err != nil {
		t.Fatal(err)
	}
	restored := &ipvs.Table{ConnTimeouts: ipvs.Timeouts{TCP: 900, TCPFin: 120, UDP: 300}}
	if err := restored.Restore(cmds); err != nil {
		t.Fatal(err)
	}
	key := ipvs.ServiceKey{Proto: ipvs.TCP, Addr: netip.MustParseAddrPort("10.0.0.1:80")}
	odd := &ipvs.Table{
		Services: []*ipvs.Service{
			{ID: 1, ServiceKey: key, Scheduler: `<&>"\` + "\x01\u2028é\xff"},
			nil,
			{ID: 7, ServiceKey: ipvs.ServiceKey{Proto: ipvs.UDP}, Servers: []ipvs.Server{}, Persistent: 1, Netmask: netip.MustParseAddr("fe80::1%eth0")},
			{ID: 8, ServiceKey: key, Servers: []ipvs.Server{{ID: 9, Weight: -1}, {ID: 10, Addr: netip.MustParseAddrPort("[::ffff:1.2.3.4]:0"), Weight: 1 << 40}}},
		},
		LastID: 4000000000,
	}
	for name, tb := range map[string]*ipvs.Table{
		"empty":    {},
		"no slice": {Services: []*ipvs.Service{}},
		"restored": restored,
		"odd":      odd,
	} {
		for _, seq := range []uint64{0, 1, 1<<64 - 1} {
			want, err := json.Marshal(snapshot{Table: tb, Seq: seq})
			if err != nil {
				t.Fatal(err)
			}
			got, err := encodeSnapshot(tb, seq)
			if err != nil {
				t.Fatalf("%s, seq %d: %v", name, seq, err)
			}
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Errorf("%s, seq %d: encoding differs from json.Marshal (-want +got):\n%s", name, seq, diff)
			}
		}
	}
	bad := &ipvs.Table{Services: []*ipvs.Service{{ServiceKey: ipvs.ServiceKey{Proto: 99}}}}
	if _, err := encodeSnapshot(bad, 0); err == nil {
		t.Error("a protocol json.Marshal refuses was encoded")
	}
}

// BenchmarkEncodeSnapshot: the save's encoding of 20000 rules (5000 rr services with three
// real servers each), hand-written against encoding/json.
func BenchmarkEncodeSnapshot(b *testing.B) {
	var rules strings.Builder
	for i := range 5000 {
		svc := fmt.Sprintf("10.%d.%d.%d:80", 100+i/65536, (i/256)%256, i%256)
		fmt.Fprintf(&rules, "-A -t %s -s rr\n", svc)
		for j := 1; j <= 3; j++ {
			fmt.Fprintf(&rules, "-a -t %s -r 172.16.%d.%d:80 -m -w 1\n", svc, j, i%250+1)
		}
	}
	cmds, err := ipvs.ParseRestore(strings.NewReader(rules.String()))
	if err != nil {
		b.Fatal(err)
	}
	tb := &ipvs.Table{}
	if err := tb.Restore(cmds); err != nil {
		b.Fatal(err)
	}
	b.Run("hand", func(b *testing.B) {
		for b.Loop() {
			if _, err := encodeSnapshot(tb, 1); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		for b.Loop() {
			if _, err := json.Marshal(snapshot{Table: tb, Seq: 1}); err != nil {
				b.Fatal(err)
			}
		}
	})
}
