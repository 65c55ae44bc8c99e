package ipvstest

import (
	"net/netip"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/kata-dp/kata-dp/control/ipvs"
)

func TestCountersInListing(t *testing.T) {
	var tb ipvs.Table
	for _, p := range []string{"-A -t 10.0.0.1:80 -s lc", "-a -t 10.0.0.1:80 -r 10.1.0.1:80 -w 2"} {
		cmd, err := ipvs.ParseParameters(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tb.Apply(cmd); err != nil {
			t.Fatal(err)
		}
	}
	s, _ := tb.Service(ipvs.ServiceKey{Proto: ipvs.TCP, Addr: netip.MustParseAddrPort("10.0.0.1:80")})
	var c Counters
	c.SetServer(s.Servers[0].ID, 3, 12)
	out, err := tb.Exec(ipvs.Command{Op: ipvs.OpList}, &c)
	if err != nil {
		t.Fatal(err)
	}
	want := ipvs.Header +
		"Prot LocalAddress:Port Scheduler Flags\n" +
		"  -> RemoteAddress:Port           Forward Weight ActiveConn InActConn\n" +
		"TCP  10.0.0.1:80 lc\n" +
		"  -> 10.1.0.1:80                  Masq    2      3          12        \n"
	if diff := cmp.Diff(want, out); diff != "" {
		t.Errorf("listing (-want +got):\n%s", diff)
	}
}
