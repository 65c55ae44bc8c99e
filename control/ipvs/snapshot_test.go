package ipvs

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestSnapshotService(t *testing.T) {
	tbl := &Table{}
	for _, p := range []string{
		"-A -t 10.0.0.1:80 -s rr", "-a -t 10.0.0.1:80 -r 10.1.0.1:80 -w 2",
		"-A -t 10.0.0.2:80 -s wlc -p 60", "-a -t 10.0.0.2:80 -r 10.1.0.2:80",
		"-A -u 10.0.0.3:53", "-a -u 10.0.0.3:53 -r 10.1.0.3:53",
	} {
		cmd, err := ParseParameters(p)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tbl.Apply(cmd); err != nil {
			t.Fatal(err)
		}
	}
	want, wantRules := tbl.Save(), tbl.Rules()
	for _, p := range []string{
		"-D -t 10.0.0.2:80", "-E -t 10.0.0.2:80 -s rr", "-a -t 10.0.0.2:80 -r 10.1.0.9:80",
		"-d -t 10.0.0.2:80 -r 10.1.0.2:80", "-A -t 10.0.0.4:80",
	} {
		cmd, _ := ParseParameters(p)
		undo := tbl.SnapshotService(cmd.Service)
		if _, err := tbl.Apply(cmd); err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		undo()
		if d := cmp.Diff(want, tbl.Save()); d != "" || tbl.Rules() != wantRules {
			t.Errorf("after undo of %q: rules %d (want %d), (-want +got):\n%s", p, tbl.Rules(), wantRules, d)
		}
	}
}
