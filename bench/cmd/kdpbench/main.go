// Command kdpbench runs the benchmark harness on its own, for working on
// the harness without building kata-dp; `kata-dp bench` is the same thing.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/kata-dp/kata-dp/bench"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := bench.Main(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		fmt.Fprintln(os.Stderr, "kdpbench:", err)
		os.Exit(1)
	}
}
