/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The xdp mode's own state and the checksum repair XDP needs.
 *
 * In xdp mode every device keeps its tc program too: XDP takes the frames it can handle and
 * hands the rest on untouched with XDP_PASS, so the tc program treats them exactly as in tc
 * mode. XDP cannot handle
 *   - frames longer than its port's max_len: GSO super-frames a tap runs through generic XDP
 *     (a redirect checks the length against the target's MTU and would drop them), and
 *   - any frame of a device with no kdp_xdp_ports entry: the control plane writes one only
 *     when the redirect target can take XDP frames (a tap always can; a veth only when its
 *     peer, which kata-dp does not own, runs XDP or has GRO on), and deletes it first when
 *     it switches an endpoint out of xdp mode. Nothing is counted or rewritten before that
 *     decision, so a frame is never processed twice.
 *
 * Checksums: a frame an ordinary socket sent carries only the pseudo-header sum in its L4
 * checksum field (CHECKSUM_PARTIAL), the rest being left to the NIC. tc redirects keep the
 * skb's note of that; XDP frames have no such note, so after an XDP redirect the receiver sees
 * a bad checksum. The port flag KDP_XDP_F_CSUM makes the program complete such checksums
 * before anything else: a field equal to the folded pseudo-header sum is taken for a partial
 * checksum and the sum is recomputed over the whole segment. Recomputing is right for a
 * complete checksum too, so a coincidental match (1 in 65536) costs time, never correctness.
 * Only for programs in driver mode: generic XDP redirects the skb itself, note included, and
 * a completed checksum would then be summed again by whoever completes the partial one.
 */
#ifndef __KDP_XDP_H
#define __KDP_XDP_H

#include <linux/bpf.h>
#include <bpf_helpers.h>
#include <bpf_endian.h>
#include "common.h"

enum kdp_xdp_flags {
	KDP_XDP_F_CSUM = 1 << 0, /* complete partial L4 checksums before redirecting */
};

/* An XDP port: a device whose XDP program may redirect, keyed by its ifindex. */
struct xdp_port {
	__u32 max_len; /* longest frame (Ethernet header included) XDP redirects; longer go to tc */
	__u32 flags;   /* enum kdp_xdp_flags */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_MAX_ENDPOINTS * 2);
	__type(key, __u32);
	__type(value, struct xdp_port);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_xdp_ports SEC(".maps");

/* kdp_xdp_tx: redirect targets, keyed by the ifindex of the device the frame came in on. */
struct {
	__uint(type, BPF_MAP_TYPE_DEVMAP_HASH);
	__uint(max_entries, KDP_MAX_ENDPOINTS * 2);
	__type(key, __u32);
	__type(value, struct bpf_devmap_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_xdp_tx SEC(".maps");

/* Chunk size: the buffer lives on the stack of a function called from programs whose own
 * frames already take about 300 of the 512 bytes a call chain may use. */
#define KDP_CSUM_CHUNK 128
#define KDP_CSUM_MAX_CHUNKS 72 /* 9 KiB: more than any frame XDP sees linear */

static __always_inline __u16 csum_fold64(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return (__u16)s;
}

/* csum_range returns the ones'-complement sum (unfolded, in memory byte order like the
 * kernel's csum_partial) of the len bytes at off in the frame, or -1 if they are not all
 * inside it. The bytes are copied chunk by chunk into a stack buffer (bpf_xdp_load_bytes)
 * rather than read in place: offsets stay plain numbers for the verifier, where packet
 * pointers of every possible length would multiply its states. The last chunk is zero-padded
 * to a multiple of 4 (bpf_csum_diff's unit); zeros add nothing to the sum. */
static __always_inline __s64 csum_range(struct xdp_md *ctx, __u32 off, __u32 len)
{
	__u8 buf[KDP_CSUM_CHUNK + 4]; /* + 4: room for the rounded-up length of the last chunk */
	__u64 sum = 0;
	int i;

	for (i = 0; i < KDP_CSUM_MAX_CHUNKS; i++) {
		if (len < KDP_CSUM_CHUNK)
			break;
		if (bpf_xdp_load_bytes(ctx, off, buf, KDP_CSUM_CHUNK))
			return -1;
		sum += (__u32)bpf_csum_diff(NULL, 0, (void *)buf, KDP_CSUM_CHUNK, 0);
		off += KDP_CSUM_CHUNK;
		len -= KDP_CSUM_CHUNK;
	}
	if (len >= KDP_CSUM_CHUNK)
		return -1; /* longer than any frame XDP sees */
	if (len > 0) {
		/* The read's length as 1..KDP_CSUM_CHUNK by arithmetic the verifier follows: Linux
		 * 6.1's does not learn from len > 0 (compiled to len != 0) that len is not zero, and
		 * refuses the read ("invalid zero-sized read"). len - 1 is hidden from the compiler,
		 * which would fold the mask away knowing len < KDP_CSUM_CHUNK. */
		__u32 n = len - 1;

		asm volatile("" : "+r"(n));
		n = (n & (KDP_CSUM_CHUNK - 1)) + 1;
		__builtin_memset(buf, 0, sizeof(buf));
		if (bpf_xdp_load_bytes(ctx, off, buf, n))
			return -1;
		sum += (__u32)bpf_csum_diff(NULL, 0, (void *)buf, (n + 3) & ~3U, 0);
	}
	return sum;
}

/* xdp_fix_csum completes a partial TCP/UDP checksum of an unfragmented IPv4 frame, or of an
 * IPv6 frame whose TCP/UDP header follows the IPv6 header (where offload puts it: a socket's
 * frames carry no extension headers). It returns -1 when the frame is malformed, 0 otherwise.
 *
 * A global (noinline) function: the verifier checks it once, on its own, and its callers only
 * see an integer come back. Inlined, each of the chunk loop's exits would make the verifier
 * walk the whole datapath after it again (loading took over a second instead of milliseconds). */
__attribute__((noinline)) int xdp_fix_csum(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	__u32 l4_off, l4_len, csum_off;
	__sum16 *check;
	__u64 pseudo;
	__u16 partial;
	__s64 sum;
	bool udp;

	if ((void *)(eth + 1) > end)
		return 0;
	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		__u32 ihl;

		if ((void *)(ip + 1) > end)
			return 0;
		if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP)
			return 0;
		if (ip->frag_off & bpf_htons(0x3fff))
			return 0; /* fragments carry no (whole) L4 header: offload never applies */
		udp = ip->protocol == IPPROTO_UDP;
		ihl = ip->ihl * 4;
		if (ihl < sizeof(*ip) || bpf_ntohs(ip->tot_len) < ihl)
			return -1;
		l4_off = ETH_HLEN + ihl;
		l4_len = bpf_ntohs(ip->tot_len) - ihl;
		pseudo = (__u64)ip->saddr + ip->daddr;
		pseudo += ((__u32)ip->protocol << 8) + bpf_htons((__u16)l4_len);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		if ((void *)(ip6 + 1) > end)
			return 0;
		if (ip6->nexthdr != IPPROTO_TCP && ip6->nexthdr != IPPROTO_UDP)
			return 0;
		udp = ip6->nexthdr == IPPROTO_UDP;
		l4_off = ETH_HLEN + sizeof(*ip6);
		l4_len = bpf_ntohs(ip6->payload_len);
		/* The pseudo-header's 32-bit length and next header sum like IPv4's 16-bit ones
		 * for any length an Ethernet frame can have. */
		pseudo = (__u64)ip6->saddr[0] + ip6->saddr[1] + ip6->saddr[2] + ip6->saddr[3] + ip6->daddr[0] +
			 ip6->daddr[1] + ip6->daddr[2] + ip6->daddr[3];
		pseudo += ((__u32)ip6->nexthdr << 8) + bpf_htons((__u16)l4_len);
	} else {
		return 0;
	}
	csum_off = l4_off + (udp ? 6 : 16);
	if (l4_off > 0xff)
		return -1;
	check = data + (csum_off & 0xff);
	if ((void *)(check + 1) > end)
		return -1;
	if (udp && *check == 0)
		return 0; /* no checksum at all */

	partial = csum_fold64(pseudo);
	if (*check != partial)
		return 0;

	*check = 0;
	sum = csum_range(ctx, l4_off, l4_len);
	if (sum < 0) {
		*check = partial; /* leave the frame as it came */
		return -1;
	}
	*check = ~csum_fold64((__u64)sum + pseudo);
	if (udp && *check == 0)
		*check = 0xffff;
	return 0;
}

/* xdp_port_of returns the XDP port of the device the frame came in on, or NULL when XDP must
 * leave the frame to tc: no port, or a frame too long to redirect. */
static __always_inline struct xdp_port *xdp_port_of(struct xdp_md *ctx)
{
	__u32 ifindex = ctx->ingress_ifindex;
	struct xdp_port *port = bpf_map_lookup_elem(&kdp_xdp_ports, &ifindex);

	if (!port || ctx->data_end - ctx->data > port->max_len)
		return NULL;
	return port;
}

#endif
