/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Header rewriting with checksum fix-ups, per hook. tc uses the kernel's helpers, which know
 * whether the skb carries a full or a partial (offloaded) checksum; XDP frames are always
 * complete, so an RFC 1624 incremental update is exact there.
 */
#ifndef __KDP_CSUM_H
#define __KDP_CSUM_H

#include <bpf_helpers.h>
#include "ctx.h"

static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* csum_replace: RFC 1624 eqn. 3, HC' = ~(~HC + ~m + m'), over 16-bit words. */
static __always_inline void csum_replace(__sum16 *sum, __u32 from, __u32 to, int size)
{
	__u32 s = (__u16)~*sum;

	if (size == 4) {
		s += (__u16)~from + (__u16)~(from >> 16);
		s += (to & 0xffff) + (to >> 16);
	} else {
		s += (__u16)~from + (to & 0xffff);
	}
	*sum = ~csum_fold32(s);
}

/* ctx_rewrite4 replaces the 4-byte field at off (an address in the IPv4 header) and fixes the
 * IP checksum at ip_csum_off and, when l4_csum_off is not 0, the L4 checksum covering it
 * through the pseudo header. mangled0 says a zero L4 checksum means "none" (UDP). */
static __always_inline int ctx_rewrite4(void *ctx, __u32 off, __u32 from, __u32 to, __u32 ip_csum_off,
					__u32 l4_csum_off, bool mangled0, const bool xdp)
{
	if (!xdp) {
		struct __sk_buff *skb = ctx;
		__u64 f = BPF_F_PSEUDO_HDR | 4 | (mangled0 ? BPF_F_MARK_MANGLED_0 : 0);

		if (l4_csum_off && bpf_l4_csum_replace(skb, l4_csum_off, from, to, f))
			return -1;
		if (bpf_l3_csum_replace(skb, ip_csum_off, from, to, 4))
			return -1;
		return bpf_skb_store_bytes(skb, off, &to, 4, 0);
	} else {
		struct xdp_md *x = ctx;
		void *data = (void *)(long)x->data, *end = (void *)(long)x->data_end;
		__u32 *field = data + (off & 0xff);
		__sum16 *ipc = data + (ip_csum_off & 0xff);
		__sum16 *l4c = data + (l4_csum_off & 0xff);

		if ((void *)(field + 1) > end || (void *)(ipc + 1) > end || (void *)(l4c + 1) > end)
			return -1;
		if (l4_csum_off && !(mangled0 && *l4c == 0)) {
			csum_replace(l4c, from, to, 4);
			if (mangled0 && *l4c == 0)
				*l4c = 0xffff;
		}
		csum_replace(ipc, from, to, 4);
		*field = to;
		return 0;
	}
}

/* ctx_rewrite2 replaces a 2-byte field (a port) covered by the L4 checksum only. */
static __always_inline int ctx_rewrite2(void *ctx, __u32 off, __u16 from, __u16 to, __u32 l4_csum_off,
					bool mangled0, const bool xdp)
{
	if (!xdp) {
		struct __sk_buff *skb = ctx;
		__u64 f = 2 | (mangled0 ? BPF_F_MARK_MANGLED_0 : 0);

		if (bpf_l4_csum_replace(skb, l4_csum_off, from, to, f))
			return -1;
		return bpf_skb_store_bytes(skb, off, &to, 2, 0);
	} else {
		struct xdp_md *x = ctx;
		void *data = (void *)(long)x->data, *end = (void *)(long)x->data_end;
		__u16 *field = data + (off & 0xff);
		__sum16 *l4c = data + (l4_csum_off & 0xff);

		if ((void *)(field + 1) > end || (void *)(l4c + 1) > end)
			return -1;
		if (!(mangled0 && *l4c == 0)) {
			csum_replace(l4c, from, to, 2);
			if (mangled0 && *l4c == 0)
				*l4c = 0xffff;
		}
		*field = to;
		return 0;
	}
}

/*
 * The load balancer's DNAT of the guest's frames (lb.h) rewrites the destination address and
 * port on the linear packet data with one combined checksum update: the one's complement
 * difference of the old and new words (RFC 1624) is summed once and folded once into the IP
 * checksum (address) and the L4 checksum (address through the pseudo header, and port). Five
 * skb helper calls did the same before, at about 180 ns per frame on this kind of machine.
 *
 * An skb's L4 checksum field means two things. With a complete checksum (CHECKSUM_NONE or
 * CHECKSUM_UNNECESSARY: what a tap makes of a guest frame without offload) it is the
 * complemented sum over pseudo header and data, updated as RFC 1624 says. With
 * CHECKSUM_PARTIAL (a guest relying on checksum offload, every GSO frame) it holds only the
 * pseudo header's sum, not complemented, and the device (or the stack) adds the data later: an
 * address change is added to it, a port change not at all. bpf_l4_csum_replace reads
 * skb->ip_summed to choose; a BPF program cannot, except through the kernel's skb itself
 * (bpf_cast_to_kern_ctx, Linux 6.3, and a CO-RE read of the ip_summed bitfield). Where that
 * is not possible (an older kernel: the kfunc is weak), the skb carries CHECKSUM_COMPLETE
 * (skb->csum would need the update too) or the headers are not in the linear data, the
 * rewrite falls back to the helpers.
 */
#define KDP_CHECKSUM_NONE 0
#define KDP_CHECKSUM_UNNECESSARY 1
#define KDP_CHECKSUM_COMPLETE 2
#define KDP_CHECKSUM_PARTIAL 3

extern void *bpf_cast_to_kern_ctx(void *obj) __weak __ksym;

/* The kernel's struct sk_buff, as much as is read here (CO-RE: the loader relocates the field
 * to the running kernel's layout). */
struct sk_buff___kdp {
	__u8 ip_summed : 2;
} __attribute__((preserve_access_index));

/* skb_ip_summed is the skb's checksum state (KDP_CHECKSUM_*), or -1 where it cannot be read. */
static __always_inline int skb_ip_summed(struct __sk_buff *skb)
{
	struct sk_buff___kdp *k;
	const void *p;
	__u64 v;

	if (!bpf_ksym_exists(bpf_cast_to_kern_ctx))
		return -1;
	k = bpf_cast_to_kern_ctx(skb);
	p = (const void *)k + __builtin_preserve_field_info(k->ip_summed, BPF_CORE_FIELD_BYTE_OFFSET);
	switch (__builtin_preserve_field_info(k->ip_summed, BPF_CORE_FIELD_BYTE_SIZE)) {
	case 1:
		v = *(const __u8 *)p;
		break;
	case 2:
		v = *(const __u16 *)p;
		break;
	case 4:
		v = *(const __u32 *)p;
		break;
	default:
		v = *(const __u64 *)p;
		break;
	}
	v <<= __builtin_preserve_field_info(k->ip_summed, BPF_CORE_FIELD_LSHIFT_U64);
	v >>= __builtin_preserve_field_info(k->ip_summed, BPF_CORE_FIELD_RSHIFT_U64);
	return (int)v;
}

/* csum_diff4 and csum_diff2 are the unfolded one's complement difference ~from + to of a
 * 4- and a 2-byte field (words in memory order, as the checksum fields). */
static __always_inline __u32 csum_diff4(__u32 from, __u32 to)
{
	return (__u16)~from + (__u16)~(from >> 16) + (to & 0xffff) + (to >> 16);
}

static __always_inline __u32 csum_diff2(__u16 from, __u16 to)
{
	return (__u16)~from + (__u32)to;
}

/* csum_apply is a complete checksum after a change of diff (RFC 1624 eqn. 3). */
static __always_inline __sum16 csum_apply(__sum16 c, __u32 diff)
{
	return ~csum_fold32((__u16)~c + diff);
}

/* csum_l4_update updates the L4 checksum at c for an address change of da (pseudo header)
 * and a port change of dp, complete or (partial) as a pseudo header sum; udp0 says a zero
 * checksum means "none" (UDP over IPv4) and stays zero, as the helpers keep it. */
static __always_inline void csum_l4_update(__sum16 *c, __u32 da, __u32 dp, bool partial, bool udp0)
{
	if (udp0 && *c == 0)
		return;
	if (partial)
		*c = csum_fold32((__u32)*c + da);
	else
		*c = csum_apply(*c, da + dp);
	if (udp0 && *c == 0)
		*c = 0xffff;
}

/* ctx_direct_csum says how the checksums of the frame may be updated on the linear data:
 * 0 complete, 1 partial, -1 not at all (use the helpers). XDP frames are always complete
 * (the XDP path completes offloaded checksums first, lib/xdp.h). */
static __always_inline int ctx_direct_csum(void *ctx, const bool xdp)
{
	int s;

	if (xdp)
		return 0;
	s = skb_ip_summed(ctx);
	if (s == KDP_CHECKSUM_PARTIAL)
		return 1;
	if (s == KDP_CHECKSUM_NONE || s == KDP_CHECKSUM_UNNECESSARY)
		return 0;
	return -1;
}

#endif
