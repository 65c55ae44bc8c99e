/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * State of direct mode's node collection: one per host uplink, shared by every sandbox whose
 * taps are joined to that uplink. It only knows where each guest MAC lives (which tap) and
 * which guest IPv4 belongs to which MAC (for ARP); everything per sandbox (anti-spoofing,
 * policy, load balancing) stays in the sandbox's own collection on its taps. bpf2go generates
 * the Go side of every struct (loader.Node*); maps.Node reads and writes the maps.
 */
#ifndef __KDP_NODE_H
#define __KDP_NODE_H

#include <linux/types.h>
#include "proto.h"

#define KDP_NODE_MAX_GUESTS 4096

/* A MAC as a map key: padded to 8 bytes so the key has no holes the verifier or Go could
 * leave uninitialised. */
struct fdb_key {
	__u8 mac[ETH_ALEN];
	__u16 pad;
};

struct fdb_entry {
	__u32 ifindex; /* the guest's tap (in the uplink's netns) */
	__u32 flags;   /* reserved */
};

struct arp_entry {
	__u8 mac[ETH_ALEN]; /* the MAC that owns the address */
	__u16 pad;
};

/* A guest IPv6 address (its global one or its link-local) as the key of kdp_nd, whose value is
 * an arp_entry: neighbour solicitations for it go to that MAC's tap only. */
struct nd_key {
	__be32 addr[4];
};

/* The uplink itself: frames a guest sends to the uplink's own MAC (the host) are turned
 * around into the uplink's ingress instead of leaving on the wire. */
struct node_cfg {
	__u8 mac[ETH_ALEN];
	__u16 pad;
	__u32 ifindex;
	__u32 flags;
};

/* Per guest tap (per-CPU): what the node programs delivered into it. Created by the control
 * plane with the fdb entry, so the datapath never inserts. */
struct node_tap_stats {
	__u64 packets; /* frames redirected into the tap (unicast and ARP) */
	__u64 bytes;
	__u64 arp;     /* of which ARP requests (and IPv6 neighbour solicitations) steered to this
			* guest only */
	__u64 local;   /* of which came from the uplink's egress (another guest or the host) */
};

/* Node-wide counters (per-CPU array), by what happened to a frame. */
enum kdp_node_ctr {
	KDP_NODE_IN_GUEST = 0,  /* uplink ingress: to a guest */
	KDP_NODE_IN_PASS = 1,   /* uplink ingress: not a guest's, passed on */
	KDP_NODE_OUT_GUEST = 2, /* uplink egress: turned into a local guest's tap */
	KDP_NODE_OUT_HOST = 3,  /* uplink egress: turned into the uplink's ingress (the host) */
	KDP_NODE_OUT_PASS = 4,  /* uplink egress: left on the wire */
	KDP_NODE_CTR_MAX = 8,
};

#endif
