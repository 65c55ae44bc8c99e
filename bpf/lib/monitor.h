/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The live monitor (kata-dp monitor): datapath events in a BPF ring buffer, one per sandbox
 * (pinned in the sandbox's directory beside its other maps), read by the agent only while a
 * monitor client listens to that sandbox.
 *
 *   drop  - every drop, from drop_frame (the one function every drop goes through)
 *   trace - every forwarded frame (mon_trace, after the forward counter)
 *   lb    - every new load-balanced connection, with the VIP and the chosen real server
 *
 * Cost when nobody listens: kdp_mon's flags are 0 (the agent sets them when a client asks for
 * a sandbox and clears them when the last one leaves). A drop or a new connection then pays one
 * array lookup on its already slow path; a forwarded frame pays one array lookup (inlined by
 * the verifier for an array map) and a branch.
 *
 * Rate limit: a per-CPU token bucket (rate events/s, burst events; kdp_mon holds both) so a
 * guest flooding bad frames cannot make the ring buffer or the agent the bottleneck. An event
 * the bucket (or a full ring) refuses is counted in its CPU's kdp_mon_rl.pending; the next
 * event that CPU emits carries that count (suppressed) and resets it, and the agent reads what
 * is still pending when a session ends.
 */
#ifndef __KDP_MONITOR_H
#define __KDP_MONITOR_H

#include <bpf_helpers.h>
#include <bpf_endian.h>
#include "ctx.h"
#include "flow.h"
#include "stats.h"

enum kdp_mon_type {
	KDP_MON_DROP = 1,
	KDP_MON_TRACE = 2,
	KDP_MON_LB = 3,
};

/* kdp_mon flags: which event types are wanted. */
enum kdp_mon_flags {
	KDP_MON_F_DROP = 1 << 0,
	KDP_MON_F_TRACE = 1 << 1,
	KDP_MON_F_LB = 1 << 2,
};

struct mon_cfg {
	__u32 flags; /* enum kdp_mon_flags; 0 = monitor off */
	__u32 rate;  /* events per second per CPU the bucket refills */
	__u32 burst; /* bucket size in events */
	__u32 pad;
};

/* One event. Addresses are the flow's (IPv4 in the first 4 bytes, IPv6 in all 16), in network
 * order; ports too. For KDP_MON_LB, daddr/dport are the VIP the guest addressed and raddr/rport
 * the real server chosen. */
struct mon_event {
	__u64 ts;          /* bpf_ktime_get_ns */
	__u32 ifindex;     /* device the frame arrived on (in the sandbox netns) */
	__u32 slot;        /* NIC slot; KDP_MON_NO_SLOT for lb events (the agent maps ifindex) */
	__u32 len;         /* frame length */
	__u32 suppressed;  /* events this CPU suppressed just before this one */
	__u8 type;         /* enum kdp_mon_type */
	__u8 dir;          /* enum kdp_dir */
	__u8 reason;       /* enum kdp_drop (drops) */
	__u8 family;       /* enum kdp_family */
	__u8 proto;        /* L4 protocol when known */
	__u8 pad;
	__be16 ethertype;
	__be16 sport;
	__be16 dport;
	__be16 rport;
	__u16 pad2;
	__u8 saddr[16];
	__u8 daddr[16];
	__u8 raddr[16];
};

#define KDP_MON_NO_SLOT 0xffffffff
#define KDP_MON_RING_SIZE (64 * 1024)

struct mon_rl {
	__u64 mtokens; /* tokens in thousandths */
	__u64 last;    /* ktime of the last refill */
	__u64 pending; /* events suppressed since this CPU's last emitted event */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mon_cfg);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_mon SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct mon_rl);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_mon_rl SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, KDP_MON_RING_SIZE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_mon_events SEC(".maps");

/* mon_wanted returns the monitor's config when it wants events of flag, else NULL. */
static __always_inline struct mon_cfg *mon_wanted(__u32 flag)
{
	__u32 zero = 0;
	struct mon_cfg *c = bpf_map_lookup_elem(&kdp_mon, &zero);

	if (c && (c->flags & flag))
		return c;
	return NULL;
}

/* mon_admit takes a token from this CPU's bucket; false (and the event counted as pending)
 * when there is none. On success *suppressed is what was pending. */
static __always_inline bool mon_admit(const struct mon_cfg *c, __u32 *suppressed)
{
	__u32 zero = 0;
	struct mon_rl *rl = bpf_map_lookup_elem(&kdp_mon_rl, &zero);
	__u64 now = bpf_ktime_get_ns(), cap, dt;

	if (!rl)
		return false;
	cap = (__u64)c->burst * 1000;
	dt = now - rl->last;
	if (dt >= 1000000000ULL)
		rl->mtokens = cap;
	else
		rl->mtokens += dt * c->rate / 1000000; /* dt < 1e9, rate <= 1e6: no overflow */
	if (rl->mtokens > cap)
		rl->mtokens = cap;
	rl->last = now;
	if (rl->mtokens < 1000) {
		rl->pending++;
		return false;
	}
	rl->mtokens -= 1000;
	*suppressed = rl->pending > 0xffffffff ? 0xffffffff : rl->pending;
	rl->pending = 0;
	return true;
}

/* mon_unadmit puts a refused output (ring full) back as pending. */
static __always_inline void mon_unadmit(__u32 suppressed)
{
	__u32 zero = 0;
	struct mon_rl *rl = bpf_map_lookup_elem(&kdp_mon_rl, &zero);

	if (rl)
		rl->pending += suppressed + 1;
}

/* mon_reserve admits an event under the rate limit and reserves it in the ring buffer with its
 * header filled (the rest zeroed); NULL when the event is suppressed or the buffer is full. */
static __always_inline struct mon_event *mon_reserve(void *ctx, const bool xdp, const struct mon_cfg *c, __u8 type,
						     __u32 slot, __u32 dir, __u32 len)
{
	struct mon_event *e;
	__u32 suppressed = 0;

	if (!mon_admit(c, &suppressed))
		return NULL;
	e = bpf_ringbuf_reserve(&kdp_mon_events, sizeof(*e), 0);
	if (!e) {
		mon_unadmit(suppressed);
		return NULL;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts = bpf_ktime_get_ns();
	e->ifindex = ctx_ifindex(ctx, xdp);
	e->slot = slot;
	e->len = len;
	e->suppressed = suppressed;
	e->type = type;
	e->dir = dir;
	return e;
}

/* mon_emit writes one event of the frame in ctx (f: its flow as the datapath parsed it, or NULL
 * when it was not parsed). Called on slow paths only, after mon_wanted. */
static __always_inline void mon_emit(void *ctx, const bool xdp, const struct mon_cfg *c, __u8 type, __u32 slot,
				     __u32 dir, __u32 reason, __u32 len, const struct flow *f)
{
	struct mon_event *e;
	struct flow fl = {};
	void *data, *data_end;

	e = mon_reserve(ctx, xdp, c, type, slot, dir, len);
	if (!e)
		return;
	e->reason = reason;
	data = ctx_data(ctx, xdp);
	data_end = ctx_data_end(ctx, xdp);
	if (data + ETH_HLEN <= data_end)
		e->ethertype = ((struct ethhdr *)data)->h_proto;
	if (f)
		fl = *f;
	else
		flow_parse_l3(data, data_end, &fl);
	if (fl.family != KDP_AF_NONE) {
		flow_ports(data, data_end, &fl);
		e->family = fl.family;
		e->proto = fl.proto;
		__builtin_memcpy(e->saddr, &fl.saddr, sizeof(fl.saddr) < 16 ? sizeof(fl.saddr) : 16);
		__builtin_memcpy(e->daddr, &fl.daddr, sizeof(fl.daddr) < 16 ? sizeof(fl.daddr) : 16);
		if (fl.flags & KDP_FLOW_PORTS) {
			e->sport = fl.sport;
			e->dport = fl.dport;
		}
	}
	bpf_ringbuf_submit(e, 0);
}

/* drop_frame counts a drop and, when the monitor listens, reports it: every drop of the
 * datapath goes through here, so a new drop reason is counted and reported without more code.
 * f is the frame's flow (NULL when it was not parsed). */
static __always_inline void drop_frame(void *ctx, const bool xdp, __u32 slot, __u32 dir, __u32 reason, __u32 len,
				       const struct flow *f)
{
	struct mon_cfg *c;

	count_drop(slot, dir, reason);
	c = mon_wanted(KDP_MON_F_DROP);
	if (c)
		mon_emit(ctx, xdp, c, KDP_MON_DROP, slot, dir, reason, len, f);
}

/* mon_trace reports a forwarded frame when the monitor asks for traces. */
static __always_inline void mon_trace(void *ctx, const bool xdp, __u32 slot, __u32 dir, __u32 len,
				      const struct flow *f)
{
	struct mon_cfg *c = mon_wanted(KDP_MON_F_TRACE);

	if (c)
		mon_emit(ctx, xdp, c, KDP_MON_TRACE, slot, dir, 0, len, f);
}

/* mon_lb reports a new load-balanced connection: f is the flow before the NAT (daddr/dport:
 * the VIP), addr/port the real server chosen (16 address bytes when the constant v6 is true,
 * else 4). */
static __always_inline void mon_lb(void *ctx, const bool xdp, __u32 len, const struct flow *f, const void *addr,
				   __be16 port, const bool v6)
{
	struct mon_cfg *c = mon_wanted(KDP_MON_F_LB);
	struct mon_event *e;

	if (!c)
		return;
	e = mon_reserve(ctx, xdp, c, KDP_MON_LB, KDP_MON_NO_SLOT, KDP_DIR_FROM_GUEST, len);
	if (!e)
		return;
	e->family = f->family;
	e->proto = f->proto;
	__builtin_memcpy(e->saddr, &f->saddr, sizeof(f->saddr) < 16 ? sizeof(f->saddr) : 16);
	__builtin_memcpy(e->daddr, &f->daddr, sizeof(f->daddr) < 16 ? sizeof(f->daddr) : 16);
	e->sport = f->sport;
	e->dport = f->dport;
	if (v6) {
		e->ethertype = bpf_htons(ETH_P_IPV6);
		__builtin_memcpy(e->raddr, addr, 16);
	} else {
		e->ethertype = bpf_htons(ETH_P_IP);
		__builtin_memcpy(e->raddr, addr, 4);
	}
	e->rport = port;
	bpf_ringbuf_submit(e, 0);
}

#endif
