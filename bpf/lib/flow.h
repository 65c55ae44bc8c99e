/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The flow: the view of a frame that the checks (guard.h) and the load balancer (lb.h) share,
 * parsed once per frame and tagged with its address family. Each user branches on f->family,
 * so IPv6 is one more branch in flow_parse, flow_ports and each user, not a change of their
 * signatures.
 * Today only IPv4 is parsed; an IPv6 frame (or any other ethertype) is KDP_AF_NONE and goes on
 * unchecked, exactly as before the flow existed.
 */
#ifndef __KDP_FLOW_H
#define __KDP_FLOW_H

#include <bpf_endian.h>
#include "proto.h"

enum kdp_family {
	KDP_AF_NONE = 0, /* not IP, or an IP frame cut off inside its header (KDP_FLOW_SHORT) */
	KDP_AF_INET = 2, /* AF_INET */
};

enum kdp_flow_flags {
	KDP_FLOW_ARP = 1 << 0,   /* an ARP frame: its fields are read in place by who needs them */
	KDP_FLOW_SHORT = 1 << 1, /* the ethertype says IPv4 but the frame ends inside the header */
	KDP_FLOW_PORTS = 1 << 2, /* an unfragmented TCP or UDP packet: l4_off, ports, tcpflags */
};

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
	__u8 proto;    /* L4 protocol (IPv4: the header's protocol), set by flow_ports */
	__u8 tcpflags; /* KDP_TCP_FIN | KDP_TCP_SYN | KDP_TCP_RST (TCP with KDP_FLOW_PORTS) */
	__u16 l4_off;  /* L4 header's offset from the frame's start (KDP_FLOW_PORTS) */
	__be16 sport;  /* KDP_FLOW_PORTS */
	__be16 dport;
	union kdp_addr saddr; /* the member of the family */
	union kdp_addr daddr;
};

/* FLOW_IN_MEMORY keeps the flow a struct on the stack that its users read field by field,
 * rather than a dozen values clang carries in the BPF's four callee-saved registers through the
 * helper calls of the checks and the load balancer (spilling and refilling them): measured, the
 * difference is a nanosecond per frame on the fast path. */
#define FLOW_IN_MEMORY(f) asm volatile("" : : "r"(f) : "memory")

/* flow_parse fills f's family and addresses from the frame. It never judges: a frame
 * too short for its Ethernet header is KDP_AF_NONE without flags, one cut off inside its IPv4
 * header KDP_FLOW_SHORT, and the checks decide what that costs it. The ports are read by
 * flow_ports, which only the load balancer needs. */
static __always_inline void flow_parse_l3(void *data, void *data_end, struct flow *f)
{
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);

	/* The other fields are only read for the family that wrote them. */
	f->family = KDP_AF_NONE;
	f->flags = 0;
	if ((void *)(eth + 1) > data_end)
		return;
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		f->flags = KDP_FLOW_ARP;
		return;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return; /* IPv6 and the rest: not parsed yet */
	if ((void *)(ip + 1) > data_end) {
		f->flags = KDP_FLOW_SHORT;
		return;
	}
	f->family = KDP_AF_INET;
	f->saddr.v4 = ip->saddr;
	f->daddr.v4 = ip->daddr;
}

static __always_inline void flow_parse(void *data, void *data_end, struct flow *f)
{
	flow_parse_l3(data, data_end, f);
	FLOW_IN_MEMORY(f);
}

/* flow_ports adds the L4 protocol to f, and the ports (KDP_FLOW_PORTS) when the frame is an unfragmented TCP or UDP
 * packet with its whole L4 header; otherwise f keeps no ports. */
static __always_inline void flow_ports(void *data, void *data_end, struct flow *f)
{
	struct iphdr *ip = data + ETH_HLEN;
	__u32 l4_off;

	f->proto = 0;
	f->l4_off = 0;
	f->tcpflags = 0;
	f->sport = 0;
	f->dport = 0;
	switch (f->family) {
	case KDP_AF_INET:
		if ((void *)(ip + 1) > data_end)
			return;
		f->proto = ip->protocol;
		if (f->proto != IPPROTO_TCP && f->proto != IPPROTO_UDP)
			return;
		if (ip->frag_off & bpf_htons(0x3fff)) /* MF or an offset: no (whole) L4 header */
			return;
		if (ip->ihl < 5)
			return;
		/* At most 74 (Ethernet + an IPv4 header with options): the mask shows the
		 * verifier the bound. */
		l4_off = (ETH_HLEN + ip->ihl * 4) & 0x7f;
		break;
	default:
		return;
	}
	f->l4_off = l4_off;
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
