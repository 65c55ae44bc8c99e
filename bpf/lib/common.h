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
	KDP_F_ANTI_SPOOF = 1 << 0,   /* every frame from the guest checked or dropped (guard.h) */
	KDP_F_STRICT_EGRESS = 1 << 1, /* guest egress only to its subnet or its routes */
	KDP_F_HAS_IP = 1 << 2,       /* ip/prefixlen are set (the NIC has an IPv4 address) */
	KDP_F_PASS = 1 << 3,         /* macvtap-bpf: check and count, then pass the frame on to the
				      * device's own path (macvlan) instead of redirecting it */
};

enum kdp_dir {
	KDP_DIR_FROM_GUEST = 0,
	KDP_DIR_TO_GUEST = 1,
	KDP_DIR_MAX = 2,
};

/* Drop reasons, one counter each. Names live in maps.DropReason: keep them in step. The first
 * KDP_DROP_BASE are counted in struct ep_stats, the rest in struct ep_drops_ext (a map of its
 * own, so the pinned kdp_stats of an earlier release keeps its layout and is re-adopted). */
enum kdp_drop {
	KDP_DROP_SPOOF_MAC = 0,
	KDP_DROP_SPOOF_IP = 1,
	KDP_DROP_SPOOF_ARP = 2,
	KDP_DROP_EGRESS_NO_ROUTE = 3,
	KDP_DROP_MALFORMED = 4,
	KDP_DROP_LB_NO_BACKEND = 5,
	KDP_DROP_LB_REWRITE = 6,
	KDP_DROP_SPOOF_IP6 = 7, /* IPv6 source not the NIC's address or link-local (nor DAD's ::) */
	KDP_DROP_BASE = 8,
	KDP_DROP_NDP = 8,       /* NS/NA with a foreign target or link-layer address option */
	KDP_DROP_RA = 9,        /* Router Advertisement or Redirect: a guest is not a router */
	KDP_DROP_VLAN = 10,     /* 802.1Q/802.1ad tagged (in the frame or the skb's vlan_tci) */
	KDP_DROP_ETHERTYPE = 11, /* neither IPv4, IPv6 nor ARP */
	KDP_DROP_NO_ADDR = 12,  /* IPv4 (or ARP other than a probe) from a NIC without an IPv4
				 * address; IPv6 from a global source on a NIC without an IPv6 one */
	KDP_DROP_MAX = 16,
};

/* An endpoint is one side of a guest NIC, keyed by the ifindex of the device the program runs
 * on (the tap, or the uplink joined to it). Both entries of a pair carry the same slot. */
struct endpoint {
	__u32 peer_ifindex; /* redirect target; 0 = not joined, frames go on (TCX_NEXT); with
			     * KDP_F_PASS only the other side's device, never redirected to */
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
	__u64 drops[KDP_DROP_BASE];
};

/* The drop reasons from KDP_DROP_BASE on, per endpoint slot and direction like ep_stats. */
struct ep_drops_ext {
	__u64 drops[KDP_DROP_MAX - KDP_DROP_BASE];
};

enum kdp_ep6_flags {
	KDP_F6_HAS_ADDR = 1 << 0, /* addr/prefixlen are set */
	KDP_F6_HAS_LL = 1 << 1,   /* ll is set: the guest's link-local (else the EUI-64 of its MAC) */
};

/* The IPv6 side of a tap endpoint (kdp_endpoints6, keyed like kdp_endpoints): a map of its own
 * so that kdp_endpoints keeps the layout of earlier releases. No entry: no IPv6 address, and
 * the link-local is the EUI-64 of the endpoint's MAC. */
struct endpoint6 {
	__be32 addr[4]; /* guest IPv6 address (KDP_F6_HAS_ADDR) */
	__be32 ll[4];   /* guest link-local address (KDP_F6_HAS_LL) */
	__u8 prefixlen; /* of addr: the NIC's on-link prefix */
	__u8 pad[3];
	__u32 flags;    /* enum kdp_ep6_flags */
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

/* IPv6 routes (kdp_routes6): the same tag and generation as struct route_key. */
struct route6_key {
	__u32 prefixlen;
	__u32 tag;
	__be32 addr[4];
};

struct route6_val {
	__be32 gateway[4];
	__u32 flags;
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
