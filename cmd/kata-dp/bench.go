package main

import "github.com/kata-dp/kata-dp/bench"

// runBench is `kata-dp bench`: the benchmark harness (bench.Main has its own flags and help).
func runBench(e *env, args []string) error {
	return bench.Main(e.ctx, args, e.stdout, e.stderr)
}
