/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Guest-side checks, independent of the hook: anti-spoofing of frames the guest sends and the
 * strict egress policy (destination on the NIC's subnet or covered by one of its routes). They
 * take the frame's flow (flow.h) and branch on its family. Each returns -1 to let the frame go
 * on, or an enum kdp_drop reason.
 */
#ifndef __KDP_GUARD_H
#define __KDP_GUARD_H

#include <bpf_helpers.h>
#include <bpf_endian.h>
#include "common.h"
#include "flow.h"

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, KDP_ROUTE_SLOTS);
	__type(key, struct route_key);
	__type(value, struct route_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_routes SEC(".maps");

static __always_inline bool mac_equal(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline bool same_subnet(const struct endpoint *ep, __be32 addr)
{
	__u32 mask;

	if (!(ep->flags & KDP_F_HAS_IP))
		return false;
	if (ep->prefixlen == 0)
		return true;
	mask = ep->prefixlen >= 32 ? 0xffffffff : ~((1U << (32 - ep->prefixlen)) - 1);
	return ((bpf_ntohl(addr) ^ bpf_ntohl(ep->ip)) & mask) == 0;
}

/* egress_allowed: limited broadcast and multicast stay link-local and always pass (DHCP, ARP
 * stand-ins, mDNS); everything else needs the subnet or a route. */
static __always_inline bool egress_allowed(const struct endpoint *ep, __u32 route_gen, __be32 daddr)
{
	struct route_key key = { .prefixlen = 64, .addr = daddr };
	__u32 d = bpf_ntohl(daddr);

	if (d == 0xffffffff || (d & 0xf0000000) == 0xe0000000)
		return true;
	if (same_subnet(ep, daddr))
		return true;
	key.tag = route_tag(route_gen, ep->slot);
	return bpf_map_lookup_elem(&kdp_routes, &key) != NULL;
}

/* check_arp validates the sender of an ARP frame (the flow's KDP_FLOW_ARP) the guest sent. */
static __always_inline int check_arp(const struct endpoint *ep, void *data, void *data_end)
{
	struct arp_eth *arp = data + sizeof(struct ethhdr);

	if ((void *)(arp + 1) > data_end)
		return KDP_DROP_MALFORMED;
	if (!mac_equal(arp->ar_sha, ep->mac))
		return KDP_DROP_SPOOF_ARP;
	/* 0.0.0.0 is an address probe (RFC 5227), not a claim. */
	if ((ep->flags & KDP_F_HAS_IP) && arp->ar_sip != 0 && arp->ar_sip != ep->ip)
		return KDP_DROP_SPOOF_ARP;
	return -1;
}

/* check_spoof validates the source of a frame the guest sent on the NIC described by ep; f is
 * the frame's flow. */
static __always_inline int check_spoof(const struct endpoint *ep, const struct flow *f, void *data, void *data_end)
{
	struct ethhdr *eth = data;
	bool spoof = ep->flags & KDP_F_ANTI_SPOOF;

	if ((void *)(eth + 1) > data_end)
		return KDP_DROP_MALFORMED;
	if (spoof && !mac_equal(eth->h_source, ep->mac))
		return KDP_DROP_SPOOF_MAC;
	switch (f->family) {
	case KDP_AF_INET:
		if (spoof && (ep->flags & KDP_F_HAS_IP) && f->saddr.v4 != ep->ip)
			return KDP_DROP_SPOOF_IP;
		return -1;
	}
	if (f->flags & (KDP_FLOW_SHORT | KDP_FLOW_MALFORMED))
		return KDP_DROP_MALFORMED;
	if (spoof && (f->flags & KDP_FLOW_ARP))
		return check_arp(ep, data, data_end);
	return -1;
}

/* check_egress applies the strict egress policy to the flow of a frame from the guest, after
 * load balancing has chosen its real destination (and updated f). */
static __always_inline int check_egress(const struct endpoint *ep, __u32 route_gen, const struct flow *f)
{
	if (!(ep->flags & KDP_F_STRICT_EGRESS))
		return -1;
	switch (f->family) {
	case KDP_AF_INET:
		if (!egress_allowed(ep, route_gen, f->daddr.v4))
			return KDP_DROP_EGRESS_NO_ROUTE;
	}
	return -1;
}

#endif
