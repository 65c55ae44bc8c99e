package loader

// The datapath object, compiled by bpf2go against the vendored headers in bpf/include.
// `make generate` reruns this; the generated files are committed so `go build` needs no clang.
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3 -nostdinc -I../bpf/include -I../bpf" -target bpfel -type endpoint -type endpoint6 -type ep_stats -type ep_drops_ext -type route_key -type route_val -type route6_key -type route6_val -type config -type lb_svc_key -type lb_svc -type lb_slot -type lb_hash -type lb_backend -type lb_stats -type lb_conns -type lb_cnt -type lb_cnc -type ct_key -type ct_entry -type ct_slot -type ct_bucket -type aff_key -type aff_entry -type lb_svc6_key -type lb_backend6 -type ct6_key -type ct6_entry -type aff6_key -type xdp_port -type mon_cfg -type mon_rl Datapath ../bpf/datapath.c

// Direct mode's node object (one collection per host uplink, see bpf/node.c).
//go:generate go tool bpf2go -cc clang -cflags "-O2 -g -Wall -Werror -mcpu=v3 -nostdinc -I../bpf/include -I../bpf" -target bpfel -type fdb_key -type fdb_entry -type arp_entry -type nd_key -type node_cfg -type node_tap_stats Node ../bpf/node.c
