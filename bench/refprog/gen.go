// Package refprog loads the benchmark's reference BPF programs
// (bpf/bench/ref.c): a bare tc bpf_redirect, a tc drop, and XDP redirect,
// drop and pass programs. They show what kata-dp's datapath costs above the
// least a BPF path can do, and where the ceiling of the path is. Beside them,
// the cold-entry probe (bpf/bench/cold.c, LoadCold): programs that touch the
// map entries a frame names, to measure what a cold entry costs.
package refprog

// `make generate` reruns this; the generated files are committed so `go build` needs no clang.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3 -nostdinc -I../../bpf/include -I../../bpf" -target bpfel ref ../../bpf/bench/ref.c
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3 -nostdinc -I../../bpf/include -I../../bpf" -target bpfel cold ../../bpf/bench/cold.c
