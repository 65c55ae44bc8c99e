// Package lbperf measures the load balancer: the datapath's cost per packet (BPF_PROG_TEST_RUN
// on crafted frames, one fresh frame per run, the kernel's own timing) for an established
// connection, a new one and a frame that is no service's, side by side in one run; and the
// control plane's cost of restoring, editing and listing 20000 rules against real maps, and of
// the sweeper's and the metrics' reads of the connection table (BenchmarkSweep). BenchmarkColdEntries
// measures what one cold map entry costs a program timed the same way (bench/refprog's
// cold-entry probe): the unit the new connection's cost is made of; BenchmarkNewConnTable the
// new connection with warm, default and large connection tables (BenchmarkNewConnWarmBuckets:
// the warm case alone, to profile). BenchmarkLBCost says where the new connection's and the
// established frame's nanoseconds go, part by part: the breakdown build (bench/lbcost) with one
// part left out at a time, or the path ended at one point, against the full path, interleaved
// frame by frame.
//
// Run: go test -run XXX -bench . -benchtime 20000x ./bench/lbperf/   (root)
package lbperf
