// Package lbcost loads the load balancer's breakdown build: the datapath object (bpf/datapath.c)
// compiled with KDP_LB_COST, in which a constant set at load time leaves one part of the
// load balancer's per-packet paths out (or does it twice: a part that cannot be left out), so
// that bench/lbperf's BenchmarkLBCost measures what each part costs as the difference between
// two loads of one object (bpf/lib/lb.h, "The breakdown build"). It is a measuring tool only:
// the product's object (loader/) is compiled without KDP_LB_COST, and none of its parts can be
// left out.
package lbcost

// `make generate` reruns this; the generated files are committed so `go build` needs no clang.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3 -nostdinc -I../../bpf/include -I../../bpf -DKDP_LB_COST" -target bpfel lbcost ../../bpf/datapath.c
