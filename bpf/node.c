//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Direct mode's node programs, one collection per host uplink (see lib/node.h). The guests'
 * taps live beside the uplink, and instead of a bridge and a veth pair per sandbox two programs
 * on the uplink steer frames by destination MAC:
 *
 *   uplink ingress --kdp_direct_in--> tap egress    (a guest's MAC, or ARP / IPv6 neighbour
 *                                                    solicitation for a guest's address)
 *   tap ingress --kdp_tap_in (sandbox)--> uplink egress --kdp_direct_out--> other tap egress
 *                                                      \-> uplink ingress (the host's MAC)
 *                                                      \-> the wire (anything else)
 *
 * Anything that is not a guest's (the host's own traffic, broadcast, multicast, unknown MACs)
 * goes on untouched with TCX_NEXT: the uplink keeps working for the host and other tc users.
 * An ARP request, and an IPv6 neighbour solicitation to a solicited-node group, is delivered to
 * the one guest owning the address asked for, never flooded to the others, so one sandbox never
 * sees another's traffic. IPv6 unicast is steered by MAC like IPv4.
 *
 * kdp_direct_rnat is the one per-sandbox program here: loaded against a sandbox's own maps
 * (config, load balancer) and attached to the TCX egress of that sandbox's tap, it gives the
 * replies the node programs deliver the reverse NAT that kdp_uplink_in gives them in tc mode.
 * The node collection itself never loads it, nor the sandbox maps it uses.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf_helpers.h>
#include <bpf_endian.h>

#include "lib/ctx.h"
#include "lib/proto.h"
#include "lib/node.h"
#include "lib/common.h"
#include "lib/config.h"
#include "lib/lb.h"

char __license[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_NODE_MAX_GUESTS);
	__type(key, struct fdb_key);
	__type(value, struct fdb_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_fdb SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_NODE_MAX_GUESTS);
	__type(key, __be32); /* guest IPv4 */
	__type(value, struct arp_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_arp SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2 * KDP_NODE_MAX_GUESTS);
	__type(key, struct nd_key); /* guest IPv6 address or link-local */
	__type(value, struct arp_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_nd SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_node_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, KDP_NODE_MAX_GUESTS);
	__type(key, __u32); /* tap ifindex */
	__type(value, struct node_tap_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_node_taps SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KDP_NODE_CTR_MAX);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_node_ctrs SEC(".maps");

static __always_inline void node_count(__u32 ctr)
{
	__u64 *c = bpf_map_lookup_elem(&kdp_node_ctrs, &ctr);

	if (c)
		(*c)++;
}

static __always_inline struct fdb_entry *fdb_lookup(const __u8 *mac)
{
	struct fdb_key k = {};

	__builtin_memcpy(k.mac, mac, ETH_ALEN);
	return bpf_map_lookup_elem(&kdp_fdb, &k);
}

static __always_inline bool mac_eq(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

/* Enough for Ethernet + IPv6 + a neighbour solicitation up to its target. */
#define KDP_NODE_PULL (ETH_HLEN + sizeof(struct ipv6hdr) + 24)

/* ns_owner returns the guest owning the target of a neighbour solicitation (an IPv6 frame
 * straight to ICMPv6, as every NS is), or NULL. */
static __always_inline struct fdb_entry *ns_owner(void *data, void *end)
{
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u8 *icmp = (void *)(ip6 + 1);
	struct arp_entry *ae;
	struct nd_key k;

	if ((void *)(icmp + 24) > end)
		return NULL;
	if (ip6->nexthdr != IPPROTO_ICMPV6 || icmp[0] != ICMPV6_NS)
		return NULL;
	__builtin_memcpy(k.addr, icmp + 8, 16);
	ae = bpf_map_lookup_elem(&kdp_nd, &k);
	if (!ae)
		return NULL;
	return fdb_lookup(ae->mac);
}

/* guest_of finds the tap a frame belongs to: its destination MAC if that is a guest's, or for
 * a broadcast ARP request or a multicast neighbour solicitation the guest that owns the address
 * asked for. *arp tells which. */
static __always_inline struct fdb_entry *guest_of(struct __sk_buff *skb, bool *arp)
{
	void *data, *end;
	struct ethhdr *eth;
	struct arp_eth *a;
	struct arp_entry *ae;
	struct fdb_entry *fe;
	__be32 tip;

	ctx_pull(skb, KDP_NODE_PULL, false);
	data = ctx_data(skb, false);
	end = ctx_data_end(skb, false);
	eth = data;
	if ((void *)(eth + 1) > end)
		return NULL;
	*arp = false;
	if (!(eth->h_dest[0] & 1))
		return fdb_lookup(eth->h_dest);
	if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		fe = ns_owner(data, end);
		if (fe)
			*arp = true;
		return fe;
	}
	if (eth->h_proto != bpf_htons(ETH_P_ARP))
		return NULL;
	a = (void *)(eth + 1);
	if ((void *)(a + 1) > end)
		return NULL;
	if (a->ar_hrd != bpf_htons(1) || a->ar_pro != bpf_htons(ETH_P_IP) || a->ar_hln != ETH_ALEN ||
	    a->ar_pln != 4 || a->ar_op != bpf_htons(ARPOP_REQUEST))
		return NULL;
	tip = a->ar_tip;
	ae = bpf_map_lookup_elem(&kdp_arp, &tip);
	if (!ae)
		return NULL;
	*arp = true;
	return fdb_lookup(ae->mac);
}

static __always_inline int deliver(struct __sk_buff *skb, struct fdb_entry *fe, bool arp, bool local)
{
	__u32 ifindex = fe->ifindex;
	struct node_tap_stats *s = bpf_map_lookup_elem(&kdp_node_taps, &ifindex);

	if (s) {
		s->packets++;
		s->bytes += skb->len;
		if (arp)
			s->arp++;
		if (local)
			s->local++;
	}
	return bpf_redirect(ifindex, 0);
}

SEC("tc")
int kdp_direct_in(struct __sk_buff *skb)
{
	struct fdb_entry *fe;
	bool arp = false;

	fe = guest_of(skb, &arp);
	if (!fe || !fe->ifindex) {
		node_count(KDP_NODE_IN_PASS);
		return TCX_NEXT;
	}
	node_count(KDP_NODE_IN_GUEST);
	return deliver(skb, fe, arp, false);
}

SEC("tc")
int kdp_direct_out(struct __sk_buff *skb)
{
	struct fdb_entry *fe;
	struct node_cfg *cfg;
	struct ethhdr *eth;
	bool arp = false;
	__u32 zero = 0;

	fe = guest_of(skb, &arp);
	/* A guest's own multicast solicitation (DAD of its address) is not turned back to it: it
	 * would take it for a duplicate. */
	if (fe && fe->ifindex && !(arp && fe->ifindex == skb->ingress_ifindex)) {
		node_count(KDP_NODE_OUT_GUEST);
		return deliver(skb, fe, arp, true);
	}
	/* guest_of pulled the Ethernet header in. */
	eth = ctx_data(skb, false);
	cfg = bpf_map_lookup_elem(&kdp_node_cfg, &zero);
	if (cfg && cfg->ifindex && (void *)(eth + 1) <= ctx_data_end(skb, false) &&
	    mac_eq(eth->h_dest, cfg->mac)) {
		node_count(KDP_NODE_OUT_HOST);
		return bpf_redirect(cfg->ifindex, BPF_F_INGRESS);
	}
	node_count(KDP_NODE_OUT_PASS);
	return TCX_NEXT;
}

SEC("tc")
int kdp_direct_rnat(struct __sk_buff *skb)
{
	struct config *cfg = config_get();
	struct flow f;

	if (!cfg || !lb_active(cfg))
		return TCX_NEXT;
	ctx_pull(skb, 128, false);
	flow_parse(ctx_data(skb, false), ctx_data_end(skb, false), &f);
	if (lb_to_guest(skb, false, cfg, skb->len, &f) >= 0)
		return TCX_DROP;
	return TCX_NEXT;
}
