package ipvsctl

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/kata-dp/kata-dp/control/ipvs"
	"github.com/kata-dp/kata-dp/control/ipvs/ipvstest"
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
	rules := ipvstest.Rules(5000)
	cmds, err := ipvs.ParseRestore(strings.NewReader(rules))
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

// TestEncodeSnapshotEveryField: the hand encoder writes every field json.Marshal writes. The
// saved structs are filled by reflection, every exported field of every nested struct, slice
// and pointer with a value of its kind (strings that need escaping, negative numbers, both
// address families); then once more with each of those fields left zero in turn, so a field
// tagged omitempty is checked both ways. A field added to ipvs.Table, Service, Server, ... that
// encodeSnapshot does not write fails here without anyone extending the table of
// TestEncodeSnapshot; a field of a type the filler cannot make fails with its path and asks for
// a value in encodeValues.
func TestEncodeSnapshotEveryField(t *testing.T) {
	var leaves int
	for skip := -1; skip == -1 || skip < leaves; skip++ {
		f := &filler{skip: skip}
		var s snapshot
		if err := f.fill(reflect.ValueOf(&s).Elem(), "snapshot"); err != nil {
			t.Fatal(err)
		}
		leaves = f.n
		want, wantErr := json.Marshal(s)
		got, err := encodeSnapshot(s.Table, s.Seq)
		name := "every field set"
		if skip >= 0 {
			name = f.skipped + " left zero"
		}
		switch {
		case wantErr != nil && err == nil:
			t.Fatalf("%s: json.Marshal fails (%v), the hand encoder does not", name, wantErr)
		case wantErr == nil && err != nil:
			t.Fatalf("%s: the hand encoder fails: %v", name, err)
		case wantErr == nil:
			if diff := cmp.Diff(string(want), string(got)); diff != "" {
				t.Fatalf("%s: encoding differs from json.Marshal (-want +got):\n%s", name, diff)
			}
		}
	}
	if leaves < 15 {
		t.Errorf("the filler set %d fields; the saved table has more", leaves)
	}
}

// encodeValues are the values the filler gives types it cannot make by their kind: types
// whose JSON comes from a method and is valid only for some values. The filler takes them in
// turn, so nested fields of one type get different values.
var encodeValues = map[reflect.Type][]any{
	reflect.TypeFor[ipvs.Proto]():     {ipvs.UDP, ipvs.TCP},
	reflect.TypeFor[netip.Addr]():     {netip.MustParseAddr("255.255.255.0"), netip.MustParseAddr("fe80::1%e<0>")},
	reflect.TypeFor[netip.AddrPort](): {netip.MustParseAddrPort("10.1.2.3:8080"), netip.MustParseAddrPort("[fd00::1:2]:443")},
}

// filler sets every exported field reachable from a value, counting the leaves (fields that
// are not structs, pointers or slices); the leaf numbered skip is left zero.
type filler struct {
	skip    int
	n       int
	skipped string // path of the leaf left zero
}

func (f *filler) fill(v reflect.Value, path string) error {
	if vals, ok := encodeValues[v.Type()]; ok {
		return f.leaf(v, path, func() { v.Set(reflect.ValueOf(vals[f.n%len(vals)])) })
	}
	switch v.Kind() {
	case reflect.Pointer:
		v.Set(reflect.New(v.Type().Elem()))
		return f.fill(v.Elem(), path)
	case reflect.Slice:
		v.Set(reflect.MakeSlice(v.Type(), 2, 2))
		for i := range 2 {
			if err := f.fill(v.Index(i), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
		return nil
	case reflect.Struct:
		exported := 0
		for i := range v.NumField() {
			sf := v.Type().Field(i)
			if !sf.IsExported() {
				continue
			}
			exported++
			if err := f.fill(v.Field(i), path+"."+sf.Name); err != nil {
				return err
			}
		}
		if exported == 0 {
			return fmt.Errorf("%s: no exported fields in %s: add values of it to encodeValues", path, v.Type())
		}
		return nil
	case reflect.String:
		return f.leaf(v, path, func() { v.SetString(fmt.Sprintf(`s%d<&>"\`, f.n)) })
	case reflect.Bool:
		return f.leaf(v, path, func() { v.SetBool(true) })
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return f.leaf(v, path, func() { v.SetInt(-int64(f.n + 1)) })
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return f.leaf(v, path, func() { v.SetUint(uint64(f.n + 1)) })
	case reflect.Float32, reflect.Float64:
		return f.leaf(v, path, func() { v.SetFloat(float64(f.n) + 0.5) })
	}
	return fmt.Errorf("%s: the filler cannot make a %s: add values of it to encodeValues", path, v.Type())
}

// leaf sets one leaf, unless it is the one to leave zero.
func (f *filler) leaf(v reflect.Value, path string, set func()) error {
	if f.n == f.skip {
		f.skipped = path
	} else {
		set()
	}
	f.n++
	return nil
}
