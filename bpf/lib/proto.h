/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Wire formats kata-dp parses. Our own definitions: the kernel's if_ether.h/ip.h pull in
 * half of the UAPI tree, and we only need these few fields. */
#ifndef __KDP_PROTO_H
#define __KDP_PROTO_H

#include <linux/types.h>

#define ETH_ALEN 6
#define ETH_HLEN 14
#define ETH_P_IP 0x0800
#define ETH_P_ARP 0x0806
#define ETH_P_IPV6 0x86DD
#define ETH_P_8021Q 0x8100  /* 802.1Q VLAN tag */
#define ETH_P_8021AD 0x88A8 /* 802.1ad service tag (QinQ's outer tag) */
#define ETH_P_QINQ1 0x9100  /* pre-standard QinQ outer tags, still seen */

#define IPPROTO_ICMP 1
#define IPPROTO_TCP 6
#define IPPROTO_UDP 17
#define IPPROTO_ICMPV6 58

/* IPv6 extension headers (RFC 8200 4.1), the ones that may stand between the IPv6 header and
 * the upper layer. */
#define IPPROTO_HOPOPTS 0
#define IPPROTO_ROUTING 43
#define IPPROTO_FRAGMENT 44
#define IPPROTO_AH 51
#define IPPROTO_DSTOPTS 60

/* ICMPv6 types the checks look at. */
#define ICMPV6_MLD_REPORT 131
#define ICMPV6_MLD_DONE 132
#define ICMPV6_MLD2_REPORT 143
#define ICMPV6_RS 133
#define ICMPV6_RA 134
#define ICMPV6_NS 135
#define ICMPV6_NA 136
#define ICMPV6_REDIRECT 137
/* Neighbour discovery options carrying a link-layer address. */
#define ND_OPT_SLLA 1
#define ND_OPT_TLLA 2

#define ARPOP_REQUEST 1
#define ARPOP_REPLY 2

struct ethhdr {
	__u8 h_dest[ETH_ALEN];
	__u8 h_source[ETH_ALEN];
	__be16 h_proto;
} __attribute__((packed));

struct iphdr {
	__u8 ihl : 4, version : 4;
	__u8 tos;
	__be16 tot_len;
	__be16 id;
	__be16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__sum16 check;
	__be32 saddr;
	__be32 daddr;
};

struct ipv6hdr {
	__u8 priority : 4, version : 4;
	__u8 flow_lbl[3];
	__be16 payload_len;
	__u8 nexthdr;
	__u8 hop_limit;
	__be32 saddr[4];
	__be32 daddr[4];
};

/* ARP for Ethernet/IPv4 (htype 1, ptype 0x0800), the only kind a virtio NIC sends. */
struct arp_eth {
	__be16 ar_hrd;
	__be16 ar_pro;
	__u8 ar_hln;
	__u8 ar_pln;
	__be16 ar_op;
	__u8 ar_sha[ETH_ALEN];
	__be32 ar_sip;
	__u8 ar_tha[ETH_ALEN];
	__be32 ar_tip;
} __attribute__((packed));

struct tcphdr {
	__be16 source;
	__be16 dest;
	__be32 seq;
	__be32 ack_seq;
	__u16 res1 : 4, doff : 4, fin : 1, syn : 1, rst : 1, psh : 1, ack : 1, urg : 1, ece : 1,
		cwr : 1;
	__be16 window;
	__sum16 check;
	__be16 urg_ptr;
};

struct udphdr {
	__be16 source;
	__be16 dest;
	__be16 len;
	__sum16 check;
};

#endif
