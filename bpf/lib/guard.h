/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Guest-side checks, independent of the hook. The rule: with anti-spoofing on, every frame the
 * guest sends is either checked or dropped, and every drop is counted with its reason:
 *
 *   - source MAC the NIC's (spoof_mac); no 802.1Q/802.1ad tag, in the frame or in the skb's
 *     vlan_tci (vlan); an ethertype other than IPv4, IPv6 and ARP (ethertype);
 *   - IPv4: source the NIC's IPv4 address (spoof_ip), which it must have (no_addr);
 *   - ARP for Ethernet/IPv4 only (malformed), sender MAC the NIC's and sender address its IPv4
 *     or 0.0.0.0, an address probe (spoof_arp); a NIC without IPv4 sends only probes (no_addr);
 *   - IPv6: source the NIC's IPv6 address (spoof_ip6; a NIC without one: no_addr), its
 *     link-local (given, or the EUI-64 of its MAC), or :: for the messages RFC 4861/3810 send
 *     before an address is valid: a DAD neighbour solicitation of one of its own addresses
 *     to a solicited-node group, a router solicitation, an MLD report. Router advertisements
 *     and redirects are dropped (ra); neighbour solicitations and advertisements are held to
 *     the NIC's own link-layer address, an advertisement (and a DAD solicitation) to one of its
 *     own addresses, and must not come in fragments (ndp). The extension headers are walked
 *     (flow.h); a chain cut short or impossible is malformed.
 * With anti-spoofing off only malformed IP is dropped. Strict egress (its own flag) holds IPv4
 * and IPv6 destinations to the NIC's prefix, link-local and multicast scope, or its routes.
 * Each check returns -1 to let the frame go on, or an enum kdp_drop reason.
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

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, KDP_ROUTE_SLOTS);
	__type(key, struct route6_key);
	__type(value, struct route6_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_routes6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_MAX_ENDPOINTS * 2);
	__type(key, __u32); /* ifindex of the tap, as in kdp_endpoints */
	__type(value, struct endpoint6);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_endpoints6 SEC(".maps");

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

/* check_arp validates an ARP frame (the flow's KDP_FLOW_ARP) the guest sent. */
static __always_inline int check_arp(const struct endpoint *ep, void *data, void *data_end)
{
	struct arp_eth *arp = data + sizeof(struct ethhdr);

	if ((void *)(arp + 1) > data_end)
		return KDP_DROP_MALFORMED;
	/* Only the one kind a virtio NIC sends: other lengths would move the fields checked. */
	if (arp->ar_hrd != bpf_htons(1) || arp->ar_pro != bpf_htons(ETH_P_IP) ||
	    arp->ar_hln != ETH_ALEN || arp->ar_pln != 4)
		return KDP_DROP_MALFORMED;
	if (!mac_equal(arp->ar_sha, ep->mac))
		return KDP_DROP_SPOOF_ARP;
	/* 0.0.0.0 is an address probe (RFC 5227), not a claim. */
	if (arp->ar_sip == 0)
		return -1;
	if (!(ep->flags & KDP_F_HAS_IP))
		return KDP_DROP_NO_ADDR;
	if (arp->ar_sip != ep->ip)
		return KDP_DROP_SPOOF_ARP;
	return -1;
}

/* An IPv6 address as 16 bytes, to build and compare. */
union kdp_in6 {
	__be32 w[4];
	__u8 b[16];
};

static __always_inline bool in6_equal(const __be32 *a, const __be32 *b)
{
	return a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3];
}

/* guest_ll is the guest's link-local address: the one configured, else the modified EUI-64
 * address of its MAC (RFC 4291 appendix A), what a guest forms by default. */
static __always_inline void guest_ll(const struct endpoint *ep, const struct endpoint6 *ep6, union kdp_in6 *ll)
{
	if (ep6 && (ep6->flags & KDP_F6_HAS_LL)) {
		__builtin_memcpy(ll->w, ep6->ll, 16);
		return;
	}
	ll->w[0] = bpf_htonl(0xfe800000);
	ll->w[1] = 0;
	ll->b[8] = ep->mac[0] ^ 0x02;
	ll->b[9] = ep->mac[1];
	ll->b[10] = ep->mac[2];
	ll->b[11] = 0xff;
	ll->b[12] = 0xfe;
	ll->b[13] = ep->mac[3];
	ll->b[14] = ep->mac[4];
	ll->b[15] = ep->mac[5];
}

/* own_addr6 says whether a is one of the guest's IPv6 addresses (its address or link-local). */
static __always_inline bool own_addr6(const struct endpoint *ep, const struct endpoint6 *ep6, const __be32 *a)
{
	union kdp_in6 ll;

	if (ep6 && (ep6->flags & KDP_F6_HAS_ADDR) && in6_equal(a, ep6->addr))
		return true;
	guest_ll(ep, ep6, &ll);
	return in6_equal(a, ll.w);
}

static __always_inline bool in6_is_ll(const __be32 *a)
{
	return (a[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000);
}

static __always_inline bool in6_is_mcast(const __be32 *a)
{
	return (a[0] & bpf_htonl(0xff000000)) == bpf_htonl(0xff000000);
}

static __always_inline bool in6_is_ll_mcast(const __be32 *a)
{
	return (a[0] & bpf_htonl(0xff0f0000)) == bpf_htonl(0xff020000);
}

/* prefix6_match: a and b agree in their first plen bits. */
static __always_inline bool prefix6_match(const __be32 *a, const __be32 *b, __u32 plen)
{
	int i;

#pragma unroll
	for (i = 0; i < 4; i++) {
		__u32 bits = plen > 32 ? 32 : plen;
		__u32 mask;

		if (bits == 0)
			return true;
		mask = bits == 32 ? 0xffffffff : ~((1U << (32 - bits)) - 1);
		if ((bpf_ntohl(a[i]) ^ bpf_ntohl(b[i])) & mask)
			return false;
		plen -= bits;
	}
	return true;
}

/* Bounds of the neighbour discovery option walk. */
#define KDP_ND_MAX_OPTS 4
#define KDP_ND_OFF_MASK 0x3ff

/* check_nd_opts walks the options of an NDP message (from off to the end of the IPv6 payload):
 * a link-layer address option must carry the NIC's MAC, and none may be there when lla is false
 * (a message from ::). Options beyond KDP_ND_MAX_OPTS, or running past the frame, are not
 * trusted. */
static __always_inline int check_nd_opts(const struct endpoint *ep, void *data, void *data_end, __u32 off, bool lla)
{
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u32 end;
	int i;

	if ((void *)(ip6 + 1) > data_end)
		return KDP_DROP_MALFORMED;
	end = ETH_HLEN + sizeof(*ip6) + bpf_ntohs(ip6->payload_len);
#pragma unroll
	for (i = 0; i < KDP_ND_MAX_OPTS; i++) {
		__u8 *o = data + (off & KDP_ND_OFF_MASK);
		__u32 len;

		if (off >= end)
			return -1;
		if ((void *)(o + 8) > data_end)
			return KDP_DROP_NDP;
		len = (__u32)o[1] * 8;
		if (len == 0) /* RFC 4861 4.6: a zero length is invalid */
			return KDP_DROP_NDP;
		if (o[0] == ND_OPT_SLLA || o[0] == ND_OPT_TLLA) {
			if (!lla || len != 8 || !mac_equal(o + 2, ep->mac))
				return KDP_DROP_NDP;
		}
		off += len;
	}
	return off >= end ? -1 : KDP_DROP_NDP;
}

/* check_icmp6 applies the NDP rules to the ICMPv6 message of f (whole or first fragment). */
static __always_inline int check_icmp6(const struct endpoint *ep, const struct endpoint6 *ep6, const struct flow *f,
				       bool unspec, void *data, void *data_end)
{
	__u32 off = f->l4_off & KDP_IPV6_MAX_L4_OFF;
	__be32 target[4];
	__u8 *m;

	switch (f->icmp_type) {
	case ICMPV6_RA:
	case ICMPV6_REDIRECT:
		return KDP_DROP_RA;
	case ICMPV6_RS:
		if (f->flags & KDP_FLOW_FRAG)
			return KDP_DROP_NDP;
		return check_nd_opts(ep, data, data_end, off + 8, !unspec);
	case ICMPV6_NS:
	case ICMPV6_NA:
		break;
	default:
		return -1;
	}
	/* RFC 6980: neighbour discovery never comes in fragments. */
	if (f->flags & KDP_FLOW_FRAG)
		return KDP_DROP_NDP;
	m = data + off;
	if ((void *)(m + 24) > data_end)
		return KDP_DROP_MALFORMED;
	__builtin_memcpy(target, m + 8, 16);
	if (in6_is_mcast(target))
		return KDP_DROP_NDP;
	/* An advertisement speaks for its target, and so does a DAD solicitation (it claims the
	 * address for its sender); an ordinary solicitation asks for someone else's. */
	if ((f->icmp_type == ICMPV6_NA || unspec) && !own_addr6(ep, ep6, target))
		return KDP_DROP_NDP;
	return check_nd_opts(ep, data, data_end, off + 24, !unspec);
}

/* check_ip6 validates the source of an IPv6 frame from the guest, and its NDP. */
static __always_inline int check_ip6(const struct endpoint *ep, __u32 ifindex, const struct flow *f, void *data,
				     void *data_end)
{
	const struct endpoint6 *ep6 = bpf_map_lookup_elem(&kdp_endpoints6, &ifindex);
	const __be32 *s = f->saddr.v6;
	bool unspec = false;

	if (f->flags & (KDP_FLOW_SHORT | KDP_FLOW_MALFORMED))
		return KDP_DROP_MALFORMED;
	if ((s[0] | s[1] | s[2] | s[3]) == 0) {
		/* ::, only before the guest has an address: DAD, RS, MLD reports, to link-local
		 * multicast; DAD to the solicited-node group ff02::1:ff00:0/104. */
		unspec = true;
		if (f->proto != IPPROTO_ICMPV6 || !f->l4_off || !in6_is_ll_mcast(f->daddr.v6))
			return KDP_DROP_SPOOF_IP6;
		switch (f->icmp_type) {
		case ICMPV6_NS:
			if (f->daddr.v6[0] != bpf_htonl(0xff020000) || f->daddr.v6[1] != 0 ||
			    f->daddr.v6[2] != bpf_htonl(1) || (f->daddr.v6[3] & bpf_htonl(0xff000000)) != bpf_htonl(0xff000000))
				return KDP_DROP_SPOOF_IP6;
			break;
		case ICMPV6_RS:
		case ICMPV6_MLD_REPORT:
		case ICMPV6_MLD2_REPORT:
			break;
		default:
			return KDP_DROP_SPOOF_IP6;
		}
	} else if (in6_is_ll(s)) {
		union kdp_in6 ll;

		guest_ll(ep, ep6, &ll);
		if (!in6_equal(s, ll.w))
			return KDP_DROP_SPOOF_IP6;
	} else {
		if (!ep6 || !(ep6->flags & KDP_F6_HAS_ADDR))
			return KDP_DROP_NO_ADDR;
		if (!in6_equal(s, ep6->addr))
			return KDP_DROP_SPOOF_IP6;
	}
	if (f->proto == IPPROTO_ICMPV6 && f->l4_off)
		return check_icmp6(ep, ep6, f, unspec, data, data_end);
	return -1;
}

/* check_spoof checks a frame the guest sent on the NIC described by ep (ifindex: its tap), f
 * being the frame's flow and tagged the skb's own VLAN tag (tc; XDP sees tags in the frame). */
static __always_inline int check_spoof(const struct endpoint *ep, __u32 ifindex, const struct flow *f, bool tagged,
				       void *data, void *data_end)
{
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return KDP_DROP_MALFORMED;
	if (!(ep->flags & KDP_F_ANTI_SPOOF)) {
		if (f->flags & (KDP_FLOW_SHORT | KDP_FLOW_MALFORMED))
			return KDP_DROP_MALFORMED;
		return -1;
	}
	if (!mac_equal(eth->h_source, ep->mac))
		return KDP_DROP_SPOOF_MAC;
	if (tagged)
		return KDP_DROP_VLAN;
	switch (f->family) {
	case KDP_AF_INET:
		if (!(ep->flags & KDP_F_HAS_IP))
			return KDP_DROP_NO_ADDR;
		if (f->saddr.v4 != ep->ip)
			return KDP_DROP_SPOOF_IP;
		return -1;
	case KDP_AF_INET6:
		return check_ip6(ep, ifindex, f, data, data_end);
	}
	if (f->flags & KDP_FLOW_SHORT)
		return KDP_DROP_MALFORMED;
	if (f->flags & KDP_FLOW_ARP)
		return check_arp(ep, data, data_end);
	if (f->flags & KDP_FLOW_VLAN)
		return KDP_DROP_VLAN;
	return KDP_DROP_ETHERTYPE;
}

/* egress6_allowed: link-local and multicast destinations stay on the link and pass; the rest
 * needs the NIC's prefix or one of its IPv6 routes. */
static __always_inline bool egress6_allowed(const struct endpoint *ep, __u32 ifindex, __u32 route_gen, const __be32 *d)
{
	const struct endpoint6 *ep6;
	struct route6_key key = { .prefixlen = 32 + 128 };

	if (in6_is_mcast(d) || in6_is_ll(d))
		return true;
	ep6 = bpf_map_lookup_elem(&kdp_endpoints6, &ifindex);
	if (ep6 && (ep6->flags & KDP_F6_HAS_ADDR) && prefix6_match(d, ep6->addr, ep6->prefixlen))
		return true;
	key.tag = route_tag(route_gen, ep->slot);
	__builtin_memcpy(key.addr, d, 16);
	return bpf_map_lookup_elem(&kdp_routes6, &key) != NULL;
}

/* check_egress applies the strict egress policy to the flow of a frame from the guest, after
 * load balancing has chosen its real destination (and updated f). */
static __always_inline int check_egress(const struct endpoint *ep, __u32 ifindex, __u32 route_gen, const struct flow *f)
{
	if (!(ep->flags & KDP_F_STRICT_EGRESS))
		return -1;
	switch (f->family) {
	case KDP_AF_INET:
		if (!egress_allowed(ep, route_gen, f->daddr.v4))
			return KDP_DROP_EGRESS_NO_ROUTE;
		break;
	case KDP_AF_INET6:
		if (!egress6_allowed(ep, ifindex, route_gen, f->daddr.v6))
			return KDP_DROP_EGRESS_NO_ROUTE;
		break;
	}
	return -1;
}

#endif
