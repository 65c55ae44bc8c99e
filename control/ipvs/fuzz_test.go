package ipvs

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

var parameterSeeds = []string{
	"--add-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 3000",
	"--edit-service --tcp-service 172.17.0.7:80 --scheduler rr --persistent 5000",
	"--delete-service --tcp-service 172.17.0.7:80",
	"--add-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 100",
	"--edit-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80 --weight 200",
	"--delete-server --tcp-service 172.17.0.7:80 --real-server 172.17.0.4:80",
	"--list", "-Ln", "-L --stats", "-L --rate -t 1.2.3.4:80", "--list --timeout",
	"--set 100 100 200", "--set 1 2", "-C", "-S -n",
	"-A -u 10.0.0.1:53 -p -s sh -M 255.255.255.0",
	"-a -t 10.0.0.1:80 -r 10.0.0.2 -mw=5",
	"-A -t 1.2.3.4:80 -p=", "-p", "--", "-", "---", "--=", "-A -t :80", "-A -t 1.2.3.4:",
	"-a -t 1.1.1.1:1 -r 1.1.1.1:99999999999999999999",
}

func checkErr(t *testing.T, in string, err error) {
	t.Helper()
	var e *Error
	if !errors.As(err, &e) {
		t.Fatalf("%q: error %v is not an *Error", in, err)
	}
	if e.Msg == "" || e.Token == "" {
		t.Fatalf("%q: error %q lacks a message or token", in, err)
	}
	if e.Code != ExitUsage && e.Code != ExitFailed && e.Code != 1 {
		t.Fatalf("%q: exit code %d", in, e.Code)
	}
}

func FuzzParseParameters(f *testing.F) {
	for _, s := range parameterSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		cmd, err := ParseParameters(in)
		if err != nil {
			checkErr(t, in, err)
			return
		}
		var tb Table
		run(t, &tb, "-A -t 172.17.0.7:80 -s rr", "-a -t 172.17.0.7:80 -r 172.17.0.4:80")
		before := tb.Clone()
		if _, err := tb.Apply(cmd); err != nil {
			checkErr(t, in, err)
			if !equalTables(before, &tb) {
				t.Fatalf("%q: failed command changed the table", in)
			}
		}
		tb.List(FormatPlain, nil)
		tb.Save()
	})
}

func FuzzParseRestore(f *testing.F) {
	f.Add("-A -t 10.10.11.12:100 -s rr -p  3000\n-a -t 10.10.11.12:100 -r  172.16.0.1:80 -m\n" +
		"-a -t 10.10.11.12:100 -r  172.16.0.1:81 -m\n-a -t 10.10.11.12:100 -r 172.16.0.1:82  -m\n")
	f.Add("\n\n-A -u 1.1.1.1:53\r\n--set 1 2 3\n-a -u 1.1.1.1:53 -r 2.2.2.2 -w 0\n")
	f.Add("-A -t 1.1.1.1:1\n-D -t 1.1.1.1:1\n")
	f.Add("-A -t 1.1.1.1:1\n-L\n")
	f.Add("")
	for _, s := range parameterSeeds {
		f.Add(s + "\n")
	}
	f.Fuzz(func(t *testing.T, in string) {
		cmds, err := ParseRestore(strings.NewReader(in))
		if err != nil {
			checkErr(t, in, err)
			return
		}
		var tb Table
		if err := tb.Restore(cmds); err != nil {
			checkErr(t, in, err)
			if tb.Rules() != 0 || len(tb.Services) != 0 {
				t.Fatalf("%q: failed restore left rules", in)
			}
			return
		}
		// What --save prints restores to the same listing.
		list, save := tb.List(FormatPlain, nil), tb.Save()
		if save == "" {
			return
		}
		again, err := ParseRestore(strings.NewReader(save))
		if err != nil {
			t.Fatalf("saved rules do not parse: %v\n%s", err, save)
		}
		var tb2 Table
		if err := tb2.Restore(again); err != nil {
			t.Fatalf("saved rules do not restore: %v\n%s", err, save)
		}
		// The same rules; the order may differ only where libipvs's
		// comparison is not transitive (restoring changes the kernel
		// order the sort starts from, as with the real ipvsadm).
		if got := tb2.List(FormatPlain, nil); sortedLines(got) != sortedLines(list) {
			t.Fatalf("rules changed through save/restore:\n%s\n---\n%s", list, got)
		}
	})
}

func equalTables(a, b *Table) bool {
	return a.Save() == b.Save() && a.Timeouts() == b.Timeouts() && a.LastID == b.LastID && a.Rules() == b.Rules()
}

func sortedLines(s string) string {
	l := strings.Split(s, "\n")
	slices.Sort(l)
	return strings.Join(l, "\n")
}
