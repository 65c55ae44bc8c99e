package ipvs

import (
	"fmt"
	"strings"
	"testing"
)

// rules20000 is a restore file of 5000 services with 3 real servers each.
func rules20000() string {
	var in strings.Builder
	for i := 0; i < 5000; i++ {
		svc := fmt.Sprintf("-t 10.%d.%d.1:80", i/256, i%256)
		fmt.Fprintf(&in, "-A %s -s rr -p 300\n", svc)
		for j := 1; j <= 3; j++ {
			fmt.Fprintf(&in, "-a %s -r 192.168.%d.%d:8080 -m -w %d\n", svc, i%250, j, j)
		}
	}
	return in.String()
}

func full(b *testing.B) *Table {
	cmds, err := ParseRestore(strings.NewReader(rules20000()))
	if err != nil {
		b.Fatal(err)
	}
	var tb Table
	if err := tb.Restore(cmds); err != nil {
		b.Fatal(err)
	}
	return &tb
}

// BenchmarkRestore20000 parses and restores 20000 rules (budget for the
// whole CLI-to-live path: 50 ms).
func BenchmarkRestore20000(b *testing.B) {
	in := rules20000()
	for b.Loop() {
		cmds, err := ParseRestoreChunks(strings.NewReader(in))
		if err != nil {
			b.Fatal(err)
		}
		var tb Table
		if err := tb.Restore(cmds...); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkList20000 lists 20000 rules (budget: 100 ms).
func BenchmarkList20000(b *testing.B) {
	tb := full(b)
	for b.Loop() {
		tb.List(FormatPlain, nil)
	}
}

// BenchmarkAddAt20000 adds and deletes a real server in a table at the
// limit minus one (budget for one add: 1 ms).
func BenchmarkAddAt20000(b *testing.B) {
	tb := full(b)
	if _, err := tb.Apply(mustParse(b, "-d -t 10.0.0.1:80 -r 192.168.0.1:8080")); err != nil {
		b.Fatal(err)
	}
	add := mustParse(b, "-a -t 10.19.135.1:80 -r 172.16.0.1 -w 3")
	del := mustParse(b, "-d -t 10.19.135.1:80 -r 172.16.0.1")
	for b.Loop() {
		if _, err := tb.Apply(add); err != nil {
			b.Fatal(err)
		}
		if _, err := tb.Apply(del); err != nil {
			b.Fatal(err)
		}
	}
}

func mustParse(b *testing.B, s string) Command {
	c, err := ParseParameters(s)
	if err != nil {
		b.Fatal(err)
	}
	return c
}

// BenchmarkValidate20000 is Table.Restore alone (the validation a restore runs after its
// parse, on the dataplane's critical path) of 20000 parsed rules.
func BenchmarkValidate20000(b *testing.B) {
	cmds, err := ParseRestoreChunks(strings.NewReader(rules20000()))
	if err != nil {
		b.Fatal(err)
	}
	for b.Loop() {
		var tb Table
		if err := tb.Restore(cmds...); err != nil {
			b.Fatal(err)
		}
	}
}
