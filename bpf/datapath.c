//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * kata-dp's datapath: one object per sandbox, joining each guest NIC's tap to its uplink (the
 * sandbox's veth) with bpf_redirect instead of Kata's ingress qdisc + u32 + mirred, and adding
 * anti-spoofing, IPVS-style load balancing, strict egress and per-endpoint counters on the way:
 *
 *   from the guest: parse (flow) -> anti-spoofing -> load balancer (DNAT) -> strict egress -> redirect
 *   to the guest:   parse (flow, only while the load balancer is active) -> reverse NAT -> redirect
 *
 * The frame is parsed once into a family-tagged flow (lib/flow.h) that the checks and the load
 * balancer share.
 *
 *   uplink ingress --kdp_uplink_in--> tap egress   (to the guest)
 *   tap ingress    --kdp_tap_in-----> uplink egress (from the guest)
 *
 * xdp mode adds kdp_xdp_tap in front of kdp_tap_in (end of this file).
 *
 * macvtap-bpf mode runs the same two programs on Kata's macvtap plumbing, and an endpoint flag
 * (KDP_F_PASS) makes both pass the frame on after their work instead of redirecting it:
 *
 *   uplink ingress --kdp_uplink_in--> (pass) macvlan's rx handler -> the macvtap's queue
 *   macvtap egress --kdp_tap_in-----> (pass) macvlan xmit -> uplink egress (or a sibling)
 *
 * macvtap queues frames for the guest from macvlan's rx handler, without the dev_queue_xmit
 * into the tap that every bpf_redirect pays (docs/benchmarks.md). Every frame the guest writes
 * to a macvtap goes through dev_queue_xmit of the macvtap (tap_get_user), whose egress hook
 * runs kdp_tap_in before macvlan transmits or delivers it anywhere, so none bypasses the checks.
 *
 * A device with no endpoint entry, or with an entry of the other role, is not ours: the frame
 * goes on untouched (TCX_NEXT), so other tc users on the same device keep working.
 */
#include <linux/bpf.h>
#include <bpf_helpers.h>
#include <bpf_endian.h>

#include "lib/ctx.h"
#include "lib/common.h"
#include "lib/stats.h"
#include "lib/config.h"
#include "lib/flow.h"
#include "lib/guard.h"
#include "lib/monitor.h"
#define KDP_LB_NEW_CONN mon_lb
#include "lib/lb.h"
#include "lib/xdp.h"

char __license[] SEC("license") = "Dual BSD/GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_MAX_ENDPOINTS * 2);
	__type(key, __u32); /* ifindex of the device the program runs on */
	__type(value, struct endpoint);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_endpoints SEC(".maps");

/* Enough for Ethernet + an IPv4 header with options + a TCP header. */
#define KDP_PULL_LEN 128

/* redirect_to sends the frame to the endpoint's peer: for tc to ifindex's egress, for XDP
 * through kdp_xdp_tx (keyed by the ingress device; its entry names the same peer). A missing
 * devmap entry hands the frame to tc rather than dropping it. */
static __always_inline int redirect_to(void *ctx, __u32 ifindex, const bool xdp)
{
	if (xdp)
		return bpf_redirect_map(&kdp_xdp_tx, ((struct xdp_md *)ctx)->ingress_ifindex, XDP_PASS);
	return bpf_redirect(ifindex, 0);
}

static __always_inline int from_guest(void *ctx, const bool xdp)
{
	__u32 ifindex = ctx_ifindex(ctx, xdp);
	struct config *cfg;
	struct endpoint *ep;
	struct flow f;
	void *data;
	__u32 len;
	int drop;

	ep = bpf_map_lookup_elem(&kdp_endpoints, &ifindex);
	if (!ep || ep->role != KDP_ROLE_TAP)
		return ctx_next(xdp);
	cfg = config_get();
	if (!cfg)
		return ctx_next(xdp);

	len = ctx_len(ctx, xdp);
	ctx_pull(ctx, KDP_PULL_LEN, xdp);
	data = ctx_data(ctx, xdp);
	flow_parse(data, ctx_data_end(ctx, xdp), &f);
	drop = check_spoof(ep, ifindex, &f, ctx_vlan_tagged(ctx, xdp), data, ctx_data_end(ctx, xdp));
	if (drop < 0)
		drop = lb_from_guest(ctx, xdp, cfg, len, &f);
	if (drop < 0)
		drop = check_egress(ep, ifindex, cfg->route_gen, &f);
	if (drop >= 0) {
		drop_frame(ctx, xdp, ep->slot, KDP_DIR_FROM_GUEST, drop, len, &f);
		return ctx_drop(xdp);
	}
	count_fwd(ep->slot, KDP_DIR_FROM_GUEST, len);
	mon_trace(ctx, xdp, ep->slot, KDP_DIR_FROM_GUEST, len, &f);
	if (!ep->peer_ifindex || (ep->flags & KDP_F_PASS))
		return ctx_next(xdp);
	return redirect_to(ctx, ep->peer_ifindex, xdp);
}

/* for_guest tells, in pass mode (KDP_F_PASS), whether a frame on the uplink goes on to the
 * guest: macvlan hands the macvtap only frames to the guest's MAC and group frames; others (to
 * the uplink's own MAC) are the sandbox netns's, and neither counted nor rewritten here. */
static __always_inline bool for_guest(void *ctx, const struct endpoint *ep, const bool xdp)
{
	__u8 *d = ctx_data(ctx, xdp);

	if ((void *)(d + ETH_ALEN) > ctx_data_end(ctx, xdp))
		return false;
	if (d[0] & 1)
		return true; /* broadcast, multicast */
	return *(__u32 *)d == *(__u32 *)ep->mac && *(__u16 *)(d + 4) == *(__u16 *)(ep->mac + 4);
}

static __always_inline int to_guest(void *ctx, const bool xdp)
{
	__u32 ifindex = ctx_ifindex(ctx, xdp);
	struct config *cfg;
	struct endpoint *ep;
	struct flow f;
	int drop = -1;
	bool pass;
	__u32 len;

	ep = bpf_map_lookup_elem(&kdp_endpoints, &ifindex);
	if (!ep || ep->role != KDP_ROLE_UPLINK)
		return ctx_next(xdp);
	pass = ep->flags & KDP_F_PASS;
	if (!pass && !ep->peer_ifindex)
		return ctx_next(xdp);
	if (pass && !for_guest(ctx, ep, xdp))
		return ctx_next(xdp);
	cfg = config_get();
	if (!cfg)
		return ctx_next(xdp);

	len = ctx_len(ctx, xdp);
	if (lb_active(cfg)) {
		ctx_pull(ctx, KDP_PULL_LEN, xdp);
		flow_parse(ctx_data(ctx, xdp), ctx_data_end(ctx, xdp), &f);
		drop = lb_to_guest(ctx, xdp, cfg, len, &f);
	}
	if (drop >= 0) {
		drop_frame(ctx, xdp, ep->slot, KDP_DIR_TO_GUEST, drop, len, &f);
		return ctx_drop(xdp);
	}
	count_fwd(ep->slot, KDP_DIR_TO_GUEST, len);
	/* The flow was parsed only while the load balancer is active. */
	mon_trace(ctx, xdp, ep->slot, KDP_DIR_TO_GUEST, len, lb_active(cfg) ? &f : NULL);
	if (pass)
		return ctx_next(xdp);
	return redirect_to(ctx, ep->peer_ifindex, xdp);
}

SEC("tc")
int kdp_tap_in(struct __sk_buff *skb)
{
	return from_guest(skb, false);
}

SEC("tc")
int kdp_uplink_in(struct __sk_buff *skb)
{
	return to_guest(skb, false);
}

/*
 * xdp mode attaches kdp_xdp_tap only; frames to the guest stay on kdp_uplink_in, because XDP
 * on a veth copies every skb into a page with XDP headroom and runs it through NAPI, which
 * costs more than the tc redirect (docs/benchmarks.md). No mode attaches kdp_xdp_uplink, the
 * same for frames to the guest: it stays (tested in loader) for an uplink that runs XDP
 * without that copy, a NIC driver with native XDP. The tc programs stay attached beside
 * these: a frame XDP leaves alone (no XDP port for its device, or too long, see lib/xdp.h)
 * goes on with XDP_PASS, untouched and uncounted, and the tc program handles it as in tc mode.
 *
 *   tap XDP           --kdp_xdp_tap-----> kdp_xdp_tx --> uplink (delivered by the veth's peer)
 *   uplink XDP        --kdp_xdp_uplink--> kdp_xdp_tx --> tap (tun's ndo_xdp_xmit; not attached)
 */
static __always_inline int xdp_forward(struct xdp_md *ctx, bool from)
{
	struct xdp_port *port = xdp_port_of(ctx);
	__u32 ifindex = ctx->ingress_ifindex;
	struct endpoint *ep;

	if (!port)
		return XDP_PASS;
	/* The checksum repair must come before the load balancer's incremental rewrites, and
	 * must not touch a frame that then goes on to tc: where the frame is still an skb (veth
	 * XDP_PASS) it keeps its note that the checksum is partial, and a completed one would be
	 * summed again. So first make sure this program will take the frame: its endpoint joined
	 * and its redirect target there (drops after the repair do no harm). */
	ep = bpf_map_lookup_elem(&kdp_endpoints, &ifindex);
	if (!ep || ep->role != (from ? KDP_ROLE_TAP : KDP_ROLE_UPLINK) || !ep->peer_ifindex)
		return XDP_PASS;
	if (!bpf_map_lookup_elem(&kdp_xdp_tx, &ifindex))
		return XDP_PASS;
	if ((port->flags & KDP_XDP_F_CSUM) && xdp_fix_csum(ctx) < 0)
		return XDP_PASS; /* malformed: let tc and the stack judge it as they would in tc mode */
	return from ? from_guest(ctx, true) : to_guest(ctx, true);
}

SEC("xdp")
int kdp_xdp_tap(struct xdp_md *ctx)
{
	return xdp_forward(ctx, true);
}

SEC("xdp")
int kdp_xdp_uplink(struct xdp_md *ctx)
{
	return xdp_forward(ctx, false);
}
