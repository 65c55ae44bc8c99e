/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The flow: the view of a frame that the checks (guard.h) and the load balancer (lb.h) share,
 * parsed once per frame and tagged with its address family. Each user branches on f->family.
 *
 * IPv4: the addresses and the protocol (the load balancer tells an ICMP error from a frame
 * its prefilter may skip before it parses any further); flow_ports adds the L4 offset and the
 * ports (only the load balancer needs them, so the IPv4 fast path pays for them only while it
 * is active, and only for frames past its prefilter).
 * IPv6: the addresses, and the upper-layer protocol and its offset, found by walking the
 * extension headers (at most KDP_IPV6_MAX_EXT of them, the upper layer starting within the
 * first KDP_IPV6_MAX_L4_OFF bytes), and the ICMPv6 type: the checks need them for every IPv6
 * frame (NDP, RA, MLD), so flow_parse reads them. flow_ports then only adds the ports.
 * 802.1Q/802.1ad tags are recognised (KDP_FLOW_VLAN) and not looked through: the checks drop
 * tagged frames, so nothing behind a tag is ever trusted.
 */
#ifndef __KDP_FLOW_H
#define __KDP_FLOW_H

#include <bpf_endian.h>
#include "proto.h"

enum kdp_family {
	KDP_AF_NONE = 0,   /* not IP, or an IP frame cut off inside its fixed header */
	KDP_AF_INET = 2,   /* AF_INET */
	KDP_AF_INET6 = 10, /* AF_INET6 */
};

enum kdp_flow_flags {
	KDP_FLOW_ARP = 1 << 0,   /* an ARP frame: its fields are read in place by who needs them */
	KDP_FLOW_SHORT = 1 << 1, /* the frame ends inside a header its ethertype announces: the
				  * IPv4 or IPv6 header (family KDP_AF_NONE), an IPv6 extension
				  * header or the ICMPv6 header (family KDP_AF_INET6) */
	KDP_FLOW_PORTS = 1 << 2, /* an unfragmented TCP or UDP packet: l4_off, ports, tcpflags */
	KDP_FLOW_VLAN = 1 << 3,  /* an 802.1Q/802.1ad tagged frame (not parsed behind the tag) */
	KDP_FLOW_MALFORMED = 1 << 4, /* IPv6 that no honest sender builds: version not 6, a
				      * hop-by-hop header not first, more than KDP_IPV6_MAX_EXT
				      * extension headers, or the upper layer too deep */
	KDP_FLOW_FRAG = 1 << 5,  /* IPv6 with a fragment header (no ports); with l4_off 0 a
				  * later fragment, proto the fragment header's next header */
};

/* IPv6 extension headers walked to find the upper layer: RFC 8200's recommended order has at
 * most six (hop-by-hop, destination options, routing, fragment, AH, destination options). */
#define KDP_IPV6_MAX_EXT 6
/* The upper-layer header must start within this many bytes of the frame. */
#define KDP_IPV6_MAX_L4_OFF 0x1ff

#define KDP_TCP_FIN 0x01
#define KDP_TCP_SYN 0x02
#define KDP_TCP_RST 0x04

union kdp_addr {
	__be32 v4;
	__be32 v6[4];
};

struct flow {
	__u8 family;   /* enum kdp_family */
	__u8 flags;    /* enum kdp_flow_flags */
	__u8 proto;    /* L4 protocol (set by flow_parse): IPv4 the header's, IPv6 the upper
			* layer behind the extension headers */
	__u8 tcpflags; /* KDP_TCP_FIN | KDP_TCP_SYN | KDP_TCP_RST (TCP with KDP_FLOW_PORTS) */
	__u16 l4_off;  /* L4 header's offset from the frame's start: IPv4 with KDP_FLOW_PORTS,
			* IPv6 whenever proto is set and the frame is not a later fragment */
	__be16 sport;  /* KDP_FLOW_PORTS */
	__be16 dport;
	__u8 icmp_type; /* IPv6 with proto IPPROTO_ICMPV6 and l4_off set: the ICMPv6 type */
	__u8 pad;
	union kdp_addr saddr; /* the member of the family */
	union kdp_addr daddr;
};

/* FLOW_IN_MEMORY keeps the flow a struct on the stack that its users read field by field,
 * rather than a dozen values clang carries in the BPF's four callee-saved registers through the
 * helper calls of the checks and the load balancer (spilling and refilling them): measured, the
 * difference is a nanosecond per frame on the fast path. */
#define FLOW_IN_MEMORY(f) asm volatile("" : : "r"(f) : "memory")

static __always_inline bool ipv6_is_ext(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_FRAGMENT ||
	       nh == IPPROTO_AH || nh == IPPROTO_DSTOPTS;
}

/* flow_parse_v6 fills f from an IPv6 frame: addresses, then the extension headers walked to
 * the upper layer (proto, l4_off) and, for ICMPv6, its type. A fragment header sets
 * KDP_FLOW_FRAG; a later fragment has no upper-layer header (l4_off 0). */
static __always_inline void flow_parse_v6(void *data, void *data_end, struct flow *f)
{
	struct ipv6hdr *ip6 = data + ETH_HLEN;
	__u32 off = ETH_HLEN + sizeof(struct ipv6hdr);
	__u8 nh;
	int i;

	if ((void *)(ip6 + 1) > data_end) {
		f->flags = KDP_FLOW_SHORT;
		return;
	}
	f->family = KDP_AF_INET6;
	f->proto = 0;
	f->l4_off = 0;
	f->icmp_type = 0;
	__builtin_memcpy(f->saddr.v6, ip6->saddr, 16);
	__builtin_memcpy(f->daddr.v6, ip6->daddr, 16);
	if (ip6->version != 6) {
		f->flags = KDP_FLOW_MALFORMED;
		return;
	}
	nh = ip6->nexthdr;
#pragma unroll
	for (i = 0; i < KDP_IPV6_MAX_EXT; i++) {
		__u8 *h = data + off;
		__u32 len;

		if (!ipv6_is_ext(nh))
			break;
		if ((void *)(h + 8) > data_end) {
			f->flags |= KDP_FLOW_SHORT;
			return;
		}
		switch (nh) {
		case IPPROTO_HOPOPTS:
			if (i != 0) { /* RFC 8200: only right after the IPv6 header */
				f->flags |= KDP_FLOW_MALFORMED;
				return;
			}
			len = ((__u32)h[1] + 1) * 8;
			break;
		case IPPROTO_FRAGMENT:
			f->flags |= KDP_FLOW_FRAG;
			if ((h[2] << 8 | h[3]) & 0xfff8) { /* a later fragment: no upper layer here */
				f->proto = h[0];
				return;
			}
			len = 8;
			break;
		case IPPROTO_AH:
			len = ((__u32)h[1] + 2) * 4;
			break;
		default: /* routing, destination options */
			len = ((__u32)h[1] + 1) * 8;
		}
		nh = h[0];
		off += len;
		if (off > KDP_IPV6_MAX_L4_OFF) {
			f->flags |= KDP_FLOW_MALFORMED;
			return;
		}
	}
	if (ipv6_is_ext(nh)) { /* more extension headers than any honest chain */
		f->flags |= KDP_FLOW_MALFORMED;
		return;
	}
	f->proto = nh;
	f->l4_off = off;
	if (nh == IPPROTO_ICMPV6) {
		__u8 *t = data + (off & KDP_IPV6_MAX_L4_OFF);

		if ((void *)(t + 4) > data_end) { /* type, code, checksum */
			f->flags |= KDP_FLOW_SHORT;
			return;
		}
		f->icmp_type = t[0];
	}
}

/* flow_parse fills f's family, addresses and L4 protocol from the frame (IPv6 also the upper
 * layer's offset and the ICMPv6 type). It
 * never judges: a frame too short for its Ethernet header is KDP_AF_NONE without flags, one cut
 * off inside a header KDP_FLOW_SHORT, a tagged one KDP_FLOW_VLAN, an impossible IPv6 chain
 * KDP_FLOW_MALFORMED, and the checks decide what that costs it. The ports are read by
 * flow_ports, which only the load balancer needs. IPv4 is tested first: it is the fast path. */
static __always_inline void flow_parse_l3(void *data, void *data_end, struct flow *f)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	__be16 proto;

	/* The other fields are only read for the family that wrote them. */
	f->family = KDP_AF_NONE;
	f->flags = 0;
	if ((void *)(eth + 1) > data_end)
		return;
	proto = eth->h_proto;
	if (proto == bpf_htons(ETH_P_IP)) {
		if ((void *)(ip + 1) > data_end) {
			f->flags = KDP_FLOW_SHORT;
			return;
		}
		f->family = KDP_AF_INET;
		f->proto = ip->protocol;
		f->saddr.v4 = ip->saddr;
		f->daddr.v4 = ip->daddr;
		return;
	}
	if (proto == bpf_htons(ETH_P_ARP)) {
		f->flags = KDP_FLOW_ARP;
		return;
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		flow_parse_v6(data, data_end, f);
		return;
	}
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD) ||
	    proto == bpf_htons(ETH_P_QINQ1))
		f->flags = KDP_FLOW_VLAN;
}

static __always_inline void flow_parse(void *data, void *data_end, struct flow *f)
{
	flow_parse_l3(data, data_end, f);
	FLOW_IN_MEMORY(f);
}

/* flow_ports adds the ports (KDP_FLOW_PORTS) when the frame is an unfragmented TCP or UDP
 * packet with its whole L4 header, and for IPv4 the L4 offset (IPv6 has it from flow_parse);
 * otherwise f keeps no ports. f is flow_parse's: its protocol is the frame's. */
static __always_inline void flow_ports(void *data, void *data_end, struct flow *f)
{
	struct iphdr *ip = data + ETH_HLEN;
	__u32 l4_off;

	f->tcpflags = 0;
	f->sport = 0;
	f->dport = 0;
	switch (f->family) {
	case KDP_AF_INET:
		f->l4_off = 0;
		if ((void *)(ip + 1) > data_end)
			return;
		if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
			return;
		if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset: no (whole) L4 header */
			return;
		if (ip->ihl < 5)
			return;
		/* At most 74 (Ethernet + an IPv4 header with options): the mask shows the
		 * verifier the bound. */
		l4_off = (ETH_HLEN + ip->ihl * 4) & 0x7f;
		f->l4_off = l4_off;
		break;
	case KDP_AF_INET6:
		if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
			return;
		if (f->flags & (KDP_FLOW_SHORT | KDP_FLOW_MALFORMED | KDP_FLOW_FRAG))
			return;
		l4_off = f->l4_off & KDP_IPV6_MAX_L4_OFF;
		break;
	default:
		f->proto = 0;
		f->l4_off = 0;
		return;
	}
	if (f->proto == IPPROTO_TCP) {
		struct tcphdr *th = data + l4_off;

		if ((void *)(th + 1) > data_end)
			return;
		f->sport = th->source;
		f->dport = th->dest;
		f->tcpflags = ((__u8 *)th)[13] & 0x07;
	} else {
		struct udphdr *uh = data + l4_off;

		if ((void *)(uh + 1) > data_end)
			return;
		f->sport = uh->source;
		f->dport = uh->dest;
	}
	f->flags |= KDP_FLOW_PORTS;
}

#endif
