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

#endif
