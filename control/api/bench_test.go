package api

import (
	"context"
	"io"
	"log/slog"
	"testing"

	"github.com/kata-dp/kata-dp/control"
	"github.com/kata-dp/kata-dp/control/controltest"
	"github.com/kata-dp/kata-dp/control/store"
)

// BenchmarkAddDelIface measures control's own cost of add-iface + del-iface without hot-plug:
// validation, fake tap and dataplane, and two durable state writes (fsync) on the test's disk.
func BenchmarkAddDelIface(b *testing.B) {
	s, err := store.Open(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	c, err := control.New(context.Background(), control.Config{Dataplane: controltest.NewMemDataplane(), Taps: controltest.NewMemTaps(), Store: s,
		CheckNetNS: func(string) error { return nil }, Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	if _, err := c.AddSandbox(ctx, control.SandboxSpec{ID: "bench", NetNS: "/ns"}); err != nil {
		b.Fatal(err)
	}
	in := []byte(`{"device":"tap0","name":"eth0","hwAddr":"02:00:00:00:00:01","mtu":1500,"IPAddresses":[{"address":"10.0.0.2","mask":"24"}]}`)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if out, err := KataNetwork(ctx, c, "bench", OpAddIface, in); err != nil {
			b.Fatal(err, string(out))
		}
		if _, err := KataNetwork(ctx, c, "bench", OpDelIface, in); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(2*b.N), "us/op")
}
