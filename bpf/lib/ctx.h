/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The ctx layer: the few operations the datapath needs from the hook it runs in. Every
 * function takes the raw context and a compile-time constant `xdp`; the callers are
 * __always_inline, so the branch for the other hook is removed before the verifier sees the
 * program, and the same parsing, checks, load balancing and counters serve a tc entry point
 * (struct __sk_buff) and an XDP one (struct xdp_md).
 */
#ifndef __KDP_CTX_H
#define __KDP_CTX_H

#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf_helpers.h>

/* For tc, TCX_* and TC_ACT_* share values (TCX_NEXT == TC_ACT_UNSPEC, TCX_PASS == TC_ACT_OK,
 * TCX_DROP == TC_ACT_SHOT, TCX_REDIRECT == TC_ACT_REDIRECT), so one program runs under TCX and
 * under a legacy clsact direct-action filter. "Next" hands the frame on untouched: the next
 * TCX program or legacy filter, or the stack. */
static __always_inline int ctx_next(const bool xdp) { return xdp ? XDP_PASS : TCX_NEXT; }
static __always_inline int ctx_drop(const bool xdp) { return xdp ? XDP_DROP : TCX_DROP; }

static __always_inline void *ctx_data(void *ctx, const bool xdp)
{
	return xdp ? (void *)(long)((struct xdp_md *)ctx)->data
		   : (void *)(long)((struct __sk_buff *)ctx)->data;
}

static __always_inline void *ctx_data_end(void *ctx, const bool xdp)
{
	return xdp ? (void *)(long)((struct xdp_md *)ctx)->data_end
		   : (void *)(long)((struct __sk_buff *)ctx)->data_end;
}

/* ctx_len is the frame's length on the wire (for tc including non-linear data). */
static __always_inline __u32 ctx_len(void *ctx, const bool xdp)
{
	if (xdp)
		return ((struct xdp_md *)ctx)->data_end - ((struct xdp_md *)ctx)->data;
	return ((struct __sk_buff *)ctx)->len;
}

static __always_inline __u32 ctx_ifindex(void *ctx, const bool xdp)
{
	return xdp ? ((struct xdp_md *)ctx)->ingress_ifindex : ((struct __sk_buff *)ctx)->ifindex;
}

/* ctx_vlan_tagged: the skb carries a VLAN tag the kernel took out of the frame (tc sees the
 * frame behind it). XDP sees the tag in the frame itself. */
static __always_inline bool ctx_vlan_tagged(void *ctx, const bool xdp)
{
	return !xdp && ((struct __sk_buff *)ctx)->vlan_present;
}

/* ctx_pull makes the first len bytes (or the whole frame, if shorter) directly readable.
 * skbs from a tap with vnet_hdr or GSO can keep headers outside the linear area; XDP frames
 * are always linear. A frame already linear that far costs no helper call: a short frame
 * (shorter than len, as every 64-byte packet) otherwise paid bpf_skb_pull_data on every pass,
 * and on a cloned skb may copy the header to make it writable, which nothing here needs. */
static __always_inline void ctx_pull(void *ctx, __u32 len, const bool xdp)
{
	struct __sk_buff *skb = ctx;
	__u32 want;

	if (xdp)
		return;
	want = len < skb->len ? len : skb->len;
	if ((long)skb->data + want <= (long)skb->data_end)
		return;
	bpf_skb_pull_data(skb, want);
}

#endif
