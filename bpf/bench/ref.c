//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Reference programs for kata-dp's benchmark: the least a BPF path can do, so the harness can
 * show what kata-dp's features cost on top of it.
 *
 *   ref_redirect  tc: bpf_redirect to the peer device named in ref_peers, nothing else
 *   ref_drop      tc: drop everything (the ceiling of the path up to the device's ingress)
 *   ref_xdp_redir XDP: bpf_redirect_map through ref_devmap to the peer, nothing else
 *   ref_xdp_drop  XDP: drop and count (the receiving end of an XDP veth->veth redirect)
 *   ref_xdp_pass  XDP: pass (makes a veth accept frames redirected into it)
 */
#include <linux/bpf.h>
#include <bpf_helpers.h>

char __license[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);   /* ifindex the program runs on */
	__type(value, __u32); /* ifindex to redirect to */
} ref_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, 8);
	__type(key, __u32);   /* ifindex the program runs on */
	__type(value, __u32); /* ifindex to redirect to */
} ref_devmap SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ref_count SEC(".maps");

SEC("tc")
int ref_redirect(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	__u32 *peer = bpf_map_lookup_elem(&ref_peers, &ifindex);

	if (!peer)
		return TCX_NEXT;
	return bpf_redirect(*peer, 0);
}

SEC("tc")
int ref_drop(struct __sk_buff *skb)
{
	return TCX_DROP;
}

/* ref_pass runs at a TCX hook and passes every frame on: the cost of the hook and of running
 * a program there, with nothing in it (the ref-macvtap-pass row). */
SEC("tc")
int ref_pass(struct __sk_buff *skb)
{
	return TCX_NEXT;
}

SEC("xdp")
int ref_xdp_redir(struct xdp_md *ctx)
{
	return bpf_redirect_map(&ref_devmap, ctx->ingress_ifindex, XDP_PASS);
}

SEC("xdp")
int ref_xdp_drop(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&ref_count, &zero);

	if (n)
		(*n)++;
	return XDP_DROP;
}

SEC("xdp")
int ref_xdp_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}
