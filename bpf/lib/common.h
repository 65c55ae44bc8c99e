/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * State shared by the datapath and the Go control plane. bpf2go generates the Go side of every
 * struct here from this object's BTF (loader.Datapath*), and package maps builds its views on
 * those types: a change here reaches Go with `make generate`.
 */
#ifndef __KDP_COMMON_H
#define __KDP_COMMON_H

#include <linux/types.h>
#include "proto.h"

#define KDP_MAX_ENDPOINTS 64 /* slots per sandbox */
#define KDP_MAX_ROUTES 1024
/* The route trie holds up to two generations while a table is swapped. */
#define KDP_ROUTE_SLOTS (2 * KDP_MAX_ROUTES)

enum kdp_role {
	KDP_ROLE_TAP = 1,    /* the VM's tap: frames from the guest arrive on its ingress */
	KDP_ROLE_UPLINK = 2, /* the sandbox's veth (or NIC): frames for the guest arrive here */
};

enum kdp_ep_flags {
	KDP_F_ANTI_SPOOF = 1 << 0,   /* check source MAC, source IPv4, ARP sender */
	KDP_F_STRICT_EGRESS = 1 << 1, /* guest egress only to its subnet or its routes */
	KDP_F_HAS_IP = 1 << 2,       /* ip/prefixlen are set */
};

enum kdp_dir {
	KDP_DIR_FROM_GUEST = 0,
	KDP_DIR_TO_GUEST = 1,
	KDP_DIR_MAX = 2,
};

/* Drop reasons, one counter each. Names live in maps.DropReason: keep them in step. */
enum kdp_drop {
	KDP_DROP_SPOOF_MAC = 0,
	KDP_DROP_SPOOF_IP = 1,
	KDP_DROP_SPOOF_ARP = 2,
	KDP_DROP_EGRESS_NO_ROUTE = 3,
	KDP_DROP_MALFORMED = 4,
	KDP_DROP_LB_NO_BACKEND = 5,
	KDP_DROP_LB_REWRITE = 6,
	KDP_DROP_RESERVED7 = 7,
	KDP_DROP_MAX = 8,
};

/* An endpoint is one side of a guest NIC, keyed by the ifindex of the device the program runs
 * on (the tap, or the uplink joined to it). Both entries of a pair carry the same slot. */
struct endpoint {
	__u32 peer_ifindex; /* redirect target; 0 = not joined, frames go on (TCX_NEXT) */
	__u32 slot;         /* index of the NIC in the sandbox: counters, routes */
	__be32 ip;          /* guest IPv4, network order */
	__u8 mac[ETH_ALEN]; /* guest MAC */
	__u8 prefixlen;     /* guest subnet prefix length */
	__u8 role;          /* enum kdp_role */
	__u32 flags;        /* enum kdp_ep_flags */
};

struct ep_stats {
	__u64 packets; /* frames forwarded */
	__u64 bytes;
	__u64 drops[KDP_DROP_MAX];
};

/* Routes: an LPM key whose first 32 data bits are a tag (route generation << 16 | NIC slot), so
 * one trie holds every NIC's table and a lookup only matches routes of the NIC the frame came
 * through. prefixlen counts the tag: 32 + the route's prefix length. A new table is written
 * under the next generation and switched in by one write of config.route_gen: the datapath
 * sees the old table or the new one, never a mix. */
struct route_key {
	__u32 prefixlen;
	__u32 tag;
	__be32 addr;
};

static __always_inline __u32 route_tag(__u32 gen, __u32 slot)
{
	return (gen << 16) | (slot & 0xffff);
}

enum kdp_cfg_flags {
	KDP_CFG_LB = 1 << 0, /* the load balancer has services or live connections */
};

/* Sandbox-wide settings, one array entry. */
struct config {
	__u32 route_gen;      /* live generation of kdp_routes */
	__u32 flags;          /* enum kdp_cfg_flags */
	__u32 lb_gen;         /* live generation of kdp_lb_svc (a restore or clear switches it) */
	__u32 tcp_timeout;    /* seconds: idle established TCP connection */
	__u32 tcpfin_timeout; /* seconds: TCP connection after FIN/RST */
	__u32 udp_timeout;    /* seconds: idle UDP flow */
};

struct route_val {
	__be32 gateway;
	__u32 flags;
};

#endif
