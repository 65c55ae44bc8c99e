/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * IPVS NAT mode, rebuilt on maps in the style of Cilium's load balancer.
 *
 * kdp_lb_svc holds, per service (VIP, port, proto), a master entry (key slot 0) with the
 * service's slots, whose meaning depends on the scheduler: the pick sequence for rr (its
 * servers of weight > 0), the real servers in kernel order for wrr (with their weights reduced
 * by the gcd: wrr walks them as the kernel does) and for the least-connection family. The
 * first KDP_LB_INLINE slots live in the master itself (struct lb_svc's s[]), which is every
 * slot of a service of up to KDP_LB_INLINE real servers, as most IPVS services are: a new
 * connection then takes one kdp_lb_svc lookup and a restore writes one entry per service
 * (docs/performance.md, "Slots in the master"). A larger service's further slots are in slot
 * blocks of KDP_LB_INLINE each (block n holds slots n * KDP_LB_INLINE..., key slot rev << 16 |
 * n), so a service takes at most one entry per rule it is made of, whatever its scheduler,
 * and 20000 rules fit in any mix. sh and dh keep their 256 buckets in one kdp_lb_hash entry
 * per service. Block and bucket keys carry the service's revision, so an edit writes the new
 * ones beside the old and switches by rewriting the master last: the master's update replaces
 * its element whole for readers (a hash map's update links a new element), so the datapath
 * never sees half a service. The whole table carries a generation (config.lb_gen), so a
 * restore or a clear switches every service at once.
 *
 * kdp_lb_ct2 is the IPv4 connection table (an array of buckets the datapath manages itself,
 * ct_lookup; kdp_lb_ct6, IPv6's, is an LRU hash): one entry per direction, the original one
 * (guest -> VIP) holding the real server, the reply one (real server -> guest) holding the VIP
 * for the reverse NAT. Connections keep their real server whatever happens to the rules, until
 * they time out (config timeouts, shortened by FIN/RST), are cleaned up, or (a full bucket)
 * are the oldest where a new connection needs a slot. kdp_lb_aff holds
 * persistence (client -> real server per service) and lblc/lblcr's destination affinity.
 * kdp_lb_stats holds IPVS's counters per service and real server; kdp_lb_conns the active and
 * inactive connection counts, kept by the datapath and re-counted by the control plane's
 * sweeper, which also expires idle IPv6 connections. Both are arrays indexed by id, each entry
 * naming the id that owns it (see lb_cnt_slot).
 */
#ifndef __KDP_LB_H
#define __KDP_LB_H

#include <bpf_helpers.h>
#include <bpf_endian.h>
#include "common.h"
#include "ctx.h"
#include "csum.h"
#include "flow.h"

/* Map sizes bound a sandbox's memory: a hash map allocates its buckets up front even without
 * preallocated entries, so every entry of max_entries costs about 16 bytes from the start.
 * They are sized for the 20000-rule contract with room for two full tables at once (the first
 * sync after an agent restart writes the whole table under a new generation beside the live
 * one; an edit writes one service twice for a moment): a service takes its master and a slot
 * block per KDP_LB_INLINE real servers beyond the master's, so 20000 rules take at most 20000
 * entries of kdp_lb_svc (5000 at three real servers per service), and at most 10000
 * sh/dh services can have real servers, each one kdp_lb_hash entry. */
#define KDP_LB_MAX_SVC_SLOTS 65536 /* masters + slot blocks of all services, two tables (2 x 20000) and an edit */
#define KDP_LB_MAX_HASH 20480      /* sh/dh bucket tables, two tables (2 x 10000) and an edit */
#define KDP_LB_MAX_BACKENDS 20480  /* real servers: every one is a rule */
/* Counters of services and real servers (kdp_lb_stats, kdp_lb_conns; see lb_cnt_slot): a half
 * of KDP_LB_CNT_HALF entries per id space, kata-ipvs ids (below 0x40000000) in the first, the
 * cluster table's above in the second, each half room for a table's 20000 rules. The maps hold
 * the first half; the loader gives them the second with a cluster table
 * (loader.Options.ExtraLBRules). */
#define KDP_LB_CNT_HALF 20480
#define KDP_LB_CT_SIZE 16384        /* default; loader.Options.CTSize resizes it per sandbox */
#define KDP_LB_AFF_SIZE 8192
/* KDP_LB_NEW_CONN is called for each new connection with the flow before the NAT and the real
 * server chosen (addr: its 4 address bytes, or 16 when the constant v6 is true); the sandbox
 * datapath defines it to report the connection to the monitor (lib/monitor.h), other users of
 * this file get nothing. */
#ifndef KDP_LB_NEW_CONN
#define KDP_LB_NEW_CONN(ctx, xdp, len, f, addr, port, v6) do { } while (0)
#endif
/*
 * The breakdown build (bench/lbcost, BenchmarkLBCost): compiled with KDP_LB_COST, the object
 * has a constant kdp_lb_cost_skip, set at load time, whose bits each leave one part of the
 * per-packet paths out (or, for a part that cannot be left out, do it twice), so that what a
 * part costs is measured as the difference of two loads of one object, not estimated. The
 * verifier removes the branches of the parts kept (the constant is known to it), so each
 * variant runs the product's code less the one part. Only that benchmark's object defines
 * KDP_LB_COST: in the product (loader/) every KDP_LB_COST_SKIP is the constant 0 and compiles
 * to nothing, and nothing is ever left out.
 */
#define KDP_COST_PREFILTER 0x1 /* lb_prefilter says "may be" without looking */
#define KDP_COST_CTLOOKUP2 0x2 /* an established frame looks its connection up twice */
#define KDP_COST_REFRESH 0x4   /* no ct_touch (last_seen, the FIN/RST close) */
#define KDP_COST_COUNT 0x8     /* no counters: neither their lookups nor their adds */
#define KDP_COST_PLAIN 0x10    /* the counters' adds plain, not atomic (loses counts across CPUs) */
#define KDP_COST_REWRITE 0x20  /* no DNAT of the frame (f is updated as if) */
#define KDP_COST_LB 0x40       /* lb_from_guest returns at once: no load balancer at all */
#define KDP_COST_CTMISS 0x80   /* a SYN skips the connection lookup (a new connection's miss) */
#define KDP_COST_MASTER2 0x100 /* a new connection looks its service's master up twice */
#define KDP_COST_SCHED 0x200   /* no lb_schedule: the master's first slot */
#define KDP_COST_PICK 0x400    /* no ct_pick: the bucket's first pair */
#define KDP_COST_CLAIM 0x800   /* the two slots taken and published with plain stores, no CAS */
#define KDP_COST_INSERT 0x1000 /* no ct_insert at all (bucket, pick, claim, writes) */
#define KDP_COST_MON 0x2000    /* no KDP_LB_NEW_CONN (the monitor's check) */
#define KDP_COST_REM 0x4000    /* the bucket by the remainder always, never the mask (twice: the part is what the mask saves) */
/* Stops, in bits 16-19: the load balancer returns "not ours" at that point of its path, so that
 * the stops taken in turn split a path's cost into consecutive parts that add up to it. */
#define KDP_STOP_PORTS 2  /* after the port parse (lb_from_guest) */
#define KDP_STOP_LOOKUP 3 /* after the connection lookup, hit or miss */
#define KDP_STOP_TOUCH 4  /* established: after ct_touch */
#define KDP_STOP_MASTER 5 /* new: after the master lookup */
#define KDP_STOP_SCHED 6  /* new: after persistence, the service's counters and the schedule */
#define KDP_STOP_INSERT 7 /* new: after the entry is made and inserted */
#define KDP_STOP_NAT 8    /* both: before the DNAT (after the counters, and the monitor's report) */
#ifdef KDP_LB_COST
volatile const __u32 kdp_lb_cost_skip = 0;
#define KDP_LB_COST_SKIP(part) (kdp_lb_cost_skip & (part))
#define KDP_LB_COST_STOP(at) (((kdp_lb_cost_skip >> 16) & 0xf) == (at))
#else
#define KDP_LB_COST_SKIP(part) 0
#define KDP_LB_COST_STOP(at) 0
#endif

/* lb_add is the counters' add: atomic, as every CPU counts into the same entry. */
#define lb_add(p, v)                                      \
	do {                                              \
		if (KDP_LB_COST_SKIP(KDP_COST_PLAIN))     \
			*(p) += (v);                      \
		else                                      \
			__sync_fetch_and_add((p), (v));   \
	} while (0)

#define KDP_LB_MAX_SCAN 64          /* real servers the least-connection schedulers compare */
#define KDP_LB_HASH_BUCKETS 256     /* sh/dh table size (IP_VS_SH_TAB_SIZE) */

enum kdp_sched {
	KDP_SCHED_RR = 1,
	KDP_SCHED_WRR = 2,
	KDP_SCHED_LC = 3,
	KDP_SCHED_WLC = 4,
	KDP_SCHED_LBLC = 5,
	KDP_SCHED_LBLCR = 6,
	KDP_SCHED_DH = 7,
	KDP_SCHED_SH = 8,
	KDP_SCHED_SED = 9,
	KDP_SCHED_NQ = 10,
};

enum kdp_ct_state {
	KDP_CT_UDP = 0,
	KDP_CT_TCP_EST = 1, /* counts as active */
	KDP_CT_TCP_FIN = 2, /* FIN or RST seen: inactive, short timeout */
};

enum kdp_lb_stats_kind {
	KDP_LB_STATS_SVC = 1,
	KDP_LB_STATS_BACKEND = 2,
};

struct lb_svc_key {
	__be32 vip;
	__be16 vport;
	__u8 proto;
	__u8 gen;  /* config.lb_gen the entry belongs to */
	__u32 slot; /* 0 = master; else rev << 16 | n: slot block n (1-based) of revision rev */
};

/* Slots a master holds itself, and a slot block holds. 8: IPVS services have a handful of
 * real servers; the master is then 120 bytes (two cache lines), where 16 would make it 216
 * and its insert dearer for the slots few services use (docs/performance.md). */
#define KDP_LB_INLINE 8

/* A slot: a real server of the service's sequence. An IPv4 real server's address and port are
 * in the slot (a real server's address never changes under its id): rr and wrr take them from
 * the slot they picked instead of looking the real server up in kdp_lb_be, one cold hash
 * lookup less per new connection. addr 0 (an IPv6 real server) has it looked up. */
struct lb_slot {
	__u32 id;     /* real server id, 0 = empty */
	__be32 addr;  /* its IPv4 address, 0 = not carried */
	__be16 port;  /* its port, with addr */
	__u16 weight; /* wrr: its weight reduced by the gcd */
};

struct lb_svc {
	__u32 id;      /* master: service id (stats, affinity) */
	__u32 count;   /* master: number of slots */
	__u32 rev;     /* master: revision of the live slot blocks and bucket table */
	__u32 persist; /* master: persistence timeout in seconds, 0 = none */
	__be32 pmask;  /* master: persistence netmask (IPv6: prefix length) */
	__u8 sched;    /* master: enum kdp_sched */
	__u8 pad;
	__u16 wmax;    /* master (wrr): largest reduced weight */
	/* master: slots 0..KDP_LB_INLINE-1; slot block n: slots n * KDP_LB_INLINE... */
	struct lb_slot s[KDP_LB_INLINE];
};

/* The 256 buckets of an sh or dh service (ip_vs_sh/ip_vs_dh's table): real server ids, 0 = no
 * destination. Keyed by the service's master key with slot = rev << 16. */
struct lb_hash {
	__u32 be[KDP_LB_HASH_BUCKETS];
};

struct lb_backend {
	__be32 ip;
	__be16 port;
	__u16 weight; /* 0 = quiesced: no new connections */
};

struct lb_stats {
	__u64 conns;
	__u64 inpkts;
	__u64 outpkts;
	__u64 inbytes;
	__u64 outbytes;
	__u64 sched; /* rr/wrr position (services) */
};

/* Connection counts of a real server, apart from lb_stats because the control plane's sweeper
 * rewrites them whole (it expires connections and re-counts) while the datapath keeps adding
 * to the other counters. */
struct lb_conns {
	__s64 active;
	__s64 inactive;
};

/* An entry of kdp_lb_stats: the counters s of the service or real server (kind, id) that owns
 * the entry; id 0 = owned by none. */
struct lb_cnt {
	__u32 id;
	__u32 kind; /* enum kdp_lb_stats_kind */
	struct lb_stats s;
};

/* An entry of kdp_lb_conns: the connection counts c of real server id, which owns the entry
 * (0 = none). */
struct lb_cnc {
	__u32 id;
	__u32 pad;
	struct lb_conns c;
};

struct ct_key {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* 0 = original (guest -> VIP), 1 = reply (real server -> guest) */
	__u16 pad;
};

struct ct_entry {
	__u64 last_seen; /* lb_now */
	__be32 addr;     /* original: real server; reply: VIP */
	__be16 port;     /* original: real server port; reply: VIP port */
	__u8 state;      /* enum kdp_ct_state */
	__u8 flags;
	__u32 backend; /* real server id */
	__u32 svc;     /* service id */
};

struct aff_key {
	__u32 svc; /* service id; high bit set for lblc/lblcr destination affinity */
	__be32 addr;
};

struct aff_entry {
	__u64 last_seen;
	__u32 backend;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_LB_MAX_SVC_SLOTS);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_svc);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_svc SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_LB_MAX_HASH);
	__type(key, struct lb_svc_key);
	__type(value, struct lb_hash);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_hash SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_backend);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_be SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KDP_LB_CNT_HALF); /* 2 x with a cluster table (loader) */
	__type(key, __u32);
	__type(value, struct lb_cnt);
	__uint(map_flags, BPF_F_MMAPABLE); /* the control plane claims and reads in place (maps.LB) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KDP_LB_CNT_HALF); /* 2 x with a cluster table (loader) */
	__type(key, __u32);
	__type(value, struct lb_cnc);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_conns SEC(".maps");

/* A slot of the IPv4 connection table (see ct_lookup): seq is even while the slot is stable
 * and odd while a CPU writes it (claimed with a compare-and-swap); last_seen 0 = never used. */
struct ct_slot {
	__u32 seq;
	__u32 pad;
	struct ct_key key;
	struct ct_entry e;
};

/* Slots per bucket: four connections, each in a pair of slots, grouped by direction: the
 * original entries in slots 0-3, the replies in 4-7, connection p in slots p and p + 4 (see
 * ct_lookup). */
#define KDP_CT_WAYS 8
#define KDP_CT_CONNS (KDP_CT_WAYS / 2)

/* A bucket of the IPv4 connection table: one array entry, so that one lookup reaches all its
 * slots. 384 bytes, six cache lines (an mmapable array's values start on a page): a
 * direction's four slots are its three. */
struct ct_bucket {
	struct ct_slot s[KDP_CT_WAYS];
};
_Static_assert(sizeof(struct ct_bucket) == 384 && sizeof(struct ct_slot) * KDP_CT_CONNS == 192,
	       "a direction's slots fill three cache lines of the bucket");

/* The table's name is its layout's version: kdp_lb_ct held the earlier ones (an LRU hash,
 * buckets of four slots, then buckets of eight with a connection's slots side by side, the
 * same shape as this one), which the loader converts into a new table pinned under this name
 * and then unpins (loader.migrateCTPin, loader.CTPin). */

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KDP_LB_CT_SIZE / KDP_CT_WAYS); /* buckets (loader.Options.CTSize / 8) */
	__type(key, __u32);
	__type(value, struct ct_bucket);
	__uint(map_flags, BPF_F_MMAPABLE); /* the control plane reads it in place (maps.LB.scanCT) */
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_ct2 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KDP_LB_AFF_SIZE);
	__type(key, struct aff_key);
	__type(value, struct aff_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_aff SEC(".maps");

/* IPv6 keeps the v4 maps' layouts (pins of a running agent are re-adopted unchanged) and gets
 * maps of its own where an address is part of an entry: kdp_lb_svc6 (masters by VIP), kdp_lb_be6
 * (real server addresses; kdp_lb_be keeps every real server's weight, with address 0 for an
 * IPv6 one, so the schedulers read weights in one place), kdp_lb_ct6 and kdp_lb_aff6
 * (persistence). An IPv6 service's master (in kdp_lb_svc6) holds its first slots as an IPv4
 * one does; its slot blocks and bucket table live in kdp_lb_svc and kdp_lb_hash under a key of
 * its own: vip = service id, vport 0, proto KDP_LB_V6_SLOTS. */
#define KDP_LB_V6_SLOTS 0xff
#define KDP_LB_MAX_SVC6 40960 /* IPv6 masters: two tables of up to 20000 services */

struct lb_svc6_key {
	__be32 vip[4];
	__be16 vport;
	__u8 proto;
	__u8 gen;
};

struct lb_backend6 {
	__be32 ip[4];
	__be16 port;
	__u16 weight;
};

struct ct6_key {
	__be32 saddr[4];
	__be32 daddr[4];
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 dir; /* 0 = original (guest -> VIP), 1 = reply (real server -> guest) */
	__u16 pad;
};

struct ct6_entry {
	__u64 last_seen;
	__be32 addr[4]; /* original: real server; reply: VIP */
	__be16 port;
	__u8 state;
	__u8 flags;
	__u32 backend;
	__u32 svc;
};

struct aff6_key {
	__u32 svc;
	__be32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_LB_MAX_SVC6);
	__type(key, struct lb_svc6_key);
	__type(value, struct lb_svc);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_svc6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, KDP_LB_MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct lb_backend6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_be6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KDP_LB_CT_SIZE);
	__type(key, struct ct6_key);
	__type(value, struct ct6_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_ct6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, KDP_LB_AFF_SIZE);
	__type(key, struct aff6_key);
	__type(value, struct aff_entry);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_aff6 SEC(".maps");

/* IPv6 keys and entries are too large for the BPF stack beside the rest of the path: they are
 * built in a per-CPU scratch entry. */
struct lb6_scratch {
	struct ct6_key ck;
	struct ct6_key rk;
	struct ct6_entry ne;
	struct ct6_entry re;
	struct aff6_key ak;
	struct lb_svc6_key mk;
	struct lb_svc_key base; /* the slots' key base of the service */
	struct aff_entry na;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb6_scratch);
} kdp_lb6_scratch SEC(".maps");

/* kdp_lb_vips is the load balancer's prefilter: one bit per hash of an address (an IPv6 one
 * folded to a word first) in two bitmaps, bits for the VIP of every service and rbits for every
 * real server, each set by the control plane before the service or real server goes live and
 * never cleared while the sandbox lives. A frame from the guest whose destination's VIP bit is
 * clear can then be neither to a service nor of a connection (every connection was made to a
 * service whose bit was set), so it skips the load balancer's connection and service lookups,
 * two hash lookups that cost non-service traffic about 100 ns with thousands of services
 * (docs/performance.md); a frame to the guest whose source's real-server bit is clear can be no
 * reply of a connection (every connection's reply comes from a real server whose bit was set),
 * so it skips the connection lookup. The array's one entry is read by the verifier-inlined
 * array lookup. The filter is exact: a set bit only costs the lookups as before. valid is not
 * KDP_LB_PREFILTER_VERSION in a sandbox pinned before the filter existed (or before this layout:
 * the loader's migration gives a map whose value changed size a fresh, zeroed one; or filled by
 * an older hash) until the control plane has filled it again from every service, real server
 * and connection there (maps.LB does at its first write); until then the filter is not used. */
#define KDP_LB_VIP_BITS 65536
/* valid is the version of the filter's hash that filled it (maps.PrefilterVersion); a filter of
 * another version (or 0: not filled yet) is not used until the control plane refills it. */
#define KDP_LB_PREFILTER_VERSION 2

struct lb_vipset {
	__u64 valid;
	__u64 bits[KDP_LB_VIP_BITS / 64];
	__u64 rbits[KDP_LB_VIP_BITS / 64];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_vipset);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_lb_vips SEC(".maps");

/* lb_vip_hash is the prefilter's hash of an address word (maps.vipHash computes the same): a
 * 32-bit integer hash whose every input bit changes every output bit (the "lowbias32"
 * constants), so that addresses differing in any octet spread over the whole array. (A bare
 * multiply let an IPv4 address's last octet, the word's top byte as loaded, reach only the top
 * 8 bits of the bit number: a whole /24 shared one column of 256 bits.) An address has two
 * bits, the hash's two halves, and may be a VIP or real server only when both are set: with
 * 5000 services (about 3500-5000 distinct addresses per array) that lets through about 1-2% of
 * other addresses instead of 5-7%. */
static __always_inline __u32 lb_vip_hash(__u32 w)
{
	w ^= w >> 16;
	w *= 0x7feb352dU;
	w ^= w >> 15;
	w *= 0x846ca68bU;
	w ^= w >> 16;
	return w;
}

/* lb_bits_have says whether both bits of hash h are set in the bitmap b. */
static __always_inline bool lb_bits_have(const __u64 *b, __u32 h)
{
	__u32 lo = h & (KDP_LB_VIP_BITS - 1), hi = (h >> 16) & (KDP_LB_VIP_BITS - 1);

	return (b[(lo >> 6) & (KDP_LB_VIP_BITS / 64 - 1)] & (1ULL << (lo & 63))) &&
	       (b[(hi >> 6) & (KDP_LB_VIP_BITS / 64 - 1)] & (1ULL << (hi & 63)));
}

/* lb_prefilter_word is the address word of a (KDP_FLOW_) family's address a, or false for a
 * frame of neither family. */
static __always_inline bool lb_prefilter_word(__u8 family, const union kdp_addr *a, __u32 *w)
{
	if (family == KDP_AF_INET)
		*w = a->v4;
	else if (family == KDP_AF_INET6)
		*w = a->v6[0] ^ a->v6[1] ^ a->v6[2] ^ a->v6[3];
	else
		return false;
	return true;
}

/* lb_prefilter says whether f may be load-balanced traffic (see kdp_lb_vips): rs false, whether
 * its destination may be a VIP (a frame from the guest); rs true, whether its source may be a
 * real server (a frame to the guest). */
static __always_inline bool lb_prefilter(const struct flow *f, const bool rs)
{
	__u32 zero = 0, w;
	struct lb_vipset *v;

	if (KDP_LB_COST_SKIP(KDP_COST_PREFILTER))
		return true;
	v = bpf_map_lookup_elem(&kdp_lb_vips, &zero);
	if (!v || v->valid != KDP_LB_PREFILTER_VERSION || !lb_prefilter_word(f->family, rs ? &f->saddr : &f->daddr, &w))
		return true;
	return lb_bits_have(rs ? v->rbits : v->bits, lb_vip_hash(w));
}

#define KDP_IP_OFF ETH_HLEN
#define KDP_IP_CSUM_OFF (ETH_HLEN + 10)
#define KDP_IP_SADDR_OFF (ETH_HLEN + 12)
#define KDP_IP_DADDR_OFF (ETH_HLEN + 16)

/*
 * The counters live in arrays (kdp_lb_stats, kdp_lb_conns) indexed by id: an array entry is
 * found without hashing or comparing keys, under 10 ns warm where a hash entry took about 50
 * (docs/performance.md, "Counters in arrays"), and a new connection looked up three of them.
 * An id's entry is lb_cnt_slot(id); each entry names the id that owns it, and the datapath
 * counts in an entry only when its owner is the id it counts for. Ids are never reused while
 * their table lives, and the tables hand out only ids whose entry no live id of the same table
 * holds (control/ipvs Table.newID, control/kube Table.id), so live ids never share an entry.
 *
 * Only the control plane claims an entry (maps.LB.ClaimCounters: it writes the owner with
 * zeroed counters when it installs a service or real server whose entry another id owns; an
 * entry its id owns already is left alone, so an edit, a restore of the same ids after an agent
 * restart and an upgrade's first sync keep counting on). The datapath never writes an owner:
 * no compare-and-swap on a new connection's path, and an entry can never be taken by an id
 * removed a moment before (a new connection racing its real server's removal). Nothing is
 * released on a removal: the entry of a deleted service or real server keeps its owner, and
 * its draining connections go on counting there, unseen (no listing shows a deleted id), until
 * a new id claims the entry. A clear or a restore thus deletes no counters at all. The one
 * inexactness: a frame of a removed id's draining connection that passed the owner check in
 * the nanoseconds before a claim of the same entry adds its packet to the new owner's zeroes.
 */
static __always_inline __u32 lb_cnt_slot(__u32 id)
{
	return id % KDP_LB_CNT_HALF + (id & 0x40000000U ? KDP_LB_CNT_HALF : 0);
}

static __always_inline struct lb_stats *lb_stats_of(__u32 kind, __u32 id)
{
	__u32 k = lb_cnt_slot(id);
	struct lb_cnt *c = bpf_map_lookup_elem(&kdp_lb_stats, &k);

	return c && c->id == id && c->kind == kind ? &c->s : NULL;
}

/* lb_conns_of is real server id's connection counts, NULL when it owns no entry. */
static __always_inline struct lb_conns *lb_conns_of(__u32 id)
{
	__u32 k = lb_cnt_slot(id);
	struct lb_cnc *c = bpf_map_lookup_elem(&kdp_lb_conns, &k);

	return c && c->id == id ? &c->c : NULL;
}

static __always_inline void lb_count_in(struct lb_stats *s, __u32 len)
{
	if (s) {
		lb_add(&s->inpkts, 1);
		lb_add(&s->inbytes, len);
	}
}

static __always_inline void lb_count(__u32 kind, __u32 id, bool in, __u32 len)
{
	struct lb_stats *s;

	if (KDP_LB_COST_SKIP(KDP_COST_COUNT))
		return;
	s = lb_stats_of(kind, id);
	if (!s)
		return;
	if (in) {
		lb_add(&s->inpkts, 1);
		lb_add(&s->inbytes, len);
	} else {
		lb_add(&s->outpkts, 1);
		lb_add(&s->outbytes, len);
	}
}

/* lb_now is the load balancer's clock: the kernel's monotonic clock at its last tick
 * (bpf_ktime_get_coarse_ns), a read of a variable, where bpf_ktime_get_ns reads the clock
 * source, which costs about 15-20 ns per frame in this kind of paravirtualized guest (pvclock)
 * and is one of the largest costs of an established connection's frame (docs/performance.md).
 * Timeouts are in seconds; the tick's few milliseconds do not matter. The sweeper (maps.LB)
 * compares with CLOCK_MONOTONIC, which is never behind it. */
static __always_inline __u64 lb_now(void)
{
	return bpf_ktime_get_coarse_ns();
}

/* lb_fresh says whether something last seen at seen is still alive at now for timeout ns. A
 * time stamp ahead of now (written from the precise clock: an entry of an older agent version,
 * or a CPU whose tick came later) is fresh, never expired by the unsigned wrap. */
static __always_inline bool lb_fresh(__u64 now, __u64 seen, __u64 timeout)
{
	return (__s64)(now - seen) <= (__s64)timeout;
}

static __always_inline __u64 ct_state_timeout_ns(const struct config *cfg, __u8 state)
{
	__u32 s = state == KDP_CT_TCP_EST ? cfg->tcp_timeout :
		  state == KDP_CT_TCP_FIN ? cfg->tcpfin_timeout : cfg->udp_timeout;

	return (__u64)s * 1000000000ULL;
}

static __always_inline __u64 ct_timeout_ns(const struct config *cfg, const struct ct_entry *e)
{
	return ct_state_timeout_ns(cfg, e->state);
}

/*
 * The IPv4 connection table, kdp_lb_ct2, is an array the datapath manages itself: open
 * addressing in buckets of KDP_CT_WAYS slots. A connection's bucket is chosen by what both of
 * its keys carry, the guest's side: its address, port and protocol (ct_hash; loader.CTHash
 * computes the same), so its two entries lie in one bucket, as a pair of slots (the original
 * direction's in slot p, the reply's in p + 4), and a new connection reads one cold bucket
 * where it read two in unrelated places (docs/performance.md). A lookup compares only the
 * slots of its key's direction, which lie together in the half of the bucket that is its
 * direction's (192 bytes, three cache lines, where pairs side by side spread them over all
 * six). A new connection takes, in its bucket, the pair holding one
 * of its keys, else one whose two entries are free or expired, else the pair whose newest
 * entry is the oldest (the table never refuses a new connection; a full bucket evicts one
 * whole connection, the least recently active one, never half of two). Both slots are claimed
 * with a compare-and-swap of their seq (odd while written) and published by incrementing it
 * again. No lock, no interrupts turned off: an insert into the LRU hash it replaces cost about
 * 210 ns on this kind of host (two raw_spin_lock_irqsave, docs/performance.md), two per new
 * connection. A reader copies the
 * entry and checks that seq did not change meanwhile; it updates last_seen (ct_refresh) and
 * the state in place, like the hash map's readers did, without claiming the slot: last_seen
 * with a compare-and-swap from the value it copied, so that a slot the control plane cleared
 * meanwhile stays empty, and a write racing a slot's reuse by another CPU can at worst
 * freshen the new entry's time stamp; the state with a compare-and-swap too (ct_close).
 * The control plane (maps.LB.Sweep) counts the live entries, never deletes expired ones (they are reused) and
 * clears the slots it cleans up.
 * So an entry in the table is not necessarily a live connection: ct_lookup judges its
 * freshness (lb_fresh against its state's timeout) and reports an expired one as no
 * connection, to every reader alike (the new-connection path, the reverse NAT and the ICMP
 * error translation: a late reply to a dead connection goes on untranslated). Only ct_pick,
 * which reuses slots, looks at expired entries. IPv6 keeps its LRU hash (kdp_lb_ct6), whose
 * expired entries the sweeper deletes a while after they expire; its readers look entries up
 * through lb_ct6_live, which judges them the same way.
 *
 * Buckets of four connections, not two: with two per bucket, 1024 connections of one guest
 * (an eighth of the default table's 8192) would lose about 0.9% of them to collisions
 * (evicted while live), against 0.05% with four per bucket and 0.09% with the earlier
 * layout's independent entries, which lost a connection when either of its two did not fit
 * (loader's TestCTCollisions, docs/performance.md). Four also leave room for a guest port
 * that talks to several services at once (a UDP socket): its connections share one bucket.
 */
#define KDP_READ_ONCE(x) (*(volatile typeof(x) *)&(x))
#define kdp_barrier() asm volatile("" ::: "memory")

/* The kernel's struct bpf_map, as much as is read here (CO-RE): the table's size, which
 * loader.Options.CTSize sets per sandbox (and a pinned table keeps). */
struct bpf_map___kdp {
	__u32 max_entries;
} __attribute__((preserve_access_index));

/* ct_hash mixes the guest's side of a connection key (both directions carry it): the guest's
 * address, port (as they lie in memory) and protocol, with the prefilter's integer hash. */
static __always_inline __u32 ct_hash(__u32 addr, __u32 port, __u32 proto)
{
	__u32 h = lb_vip_hash(addr ^ 0x9e3779b9U);

	return lb_vip_hash(h ^ (port | proto << 16));
}

/* ct_bucket is the bucket of a key of words w0..w3 (saddr, daddr, sport | dport << 16 and
 * proto | dir << 8 on a little-endian machine) and direction d (0 or 1: the guest is the
 * source of an original key, the destination of a reply key), or NULL. */
static __always_inline struct ct_bucket *ct_bucket(__u32 w0, __u32 w1, __u32 w2, __u32 w3, __u32 d)
{
	__u32 n = ((struct bpf_map___kdp *)&kdp_lb_ct2)->max_entries, idx;

	if (!n)
		return NULL;
	idx = ct_hash(d ? w1 : w0, d ? w2 >> 16 : w2 & 0xffff, w3 & 0xff);
	/* A table of 2^k buckets (the default's 2048, any power-of-two CTSize) takes the remainder
	 * as a mask, the same bucket without the division, which cost the established frame 3-4
	 * ns (docs/performance.md, "Where the load balancer's nanoseconds go"). */
	idx = !KDP_LB_COST_SKIP(KDP_COST_REM) && !(n & (n - 1)) ? idx & (n - 1) : idx % n;
	return bpf_map_lookup_elem(&kdp_lb_ct2, &idx);
}

static __always_inline bool ct_key_is(const struct ct_key *a, __u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	const __u32 *x = (const __u32 *)a;

	return x[0] == w0 && x[1] == w1 && x[2] == w2 && x[3] == w3;
}

/* ct_lookup finds the live entry of k, whose direction is d (k->dir, which the callers know
 * as a constant: the bucket's and the slots' choice by it then compiles to none), at now: it
 * copies it to out and returns its slot, or NULL when there is none, when the entry expired
 * (cfg's timeout for its state: its slot is kept until reused, and an expired entry is no
 * connection) or when it was being written. On NULL out holds anything (a copy that did not
 * hold). */
static __always_inline struct ct_slot *ct_lookup(const struct config *cfg, __u64 now, const struct ct_key *k,
						 const __u32 d, struct ct_entry *out)
{
	const __u32 *w = (const __u32 *)k;
	struct ct_bucket *b = ct_bucket(w[0], w[1], w[2], w[3], d);
	int i;

	if (!b)
		return NULL;
#pragma unroll
	for (i = 0; i < KDP_CT_CONNS; i++) {
		struct ct_slot *s = &b->s[d * KDP_CT_CONNS + i]; /* the slots of k's direction */
		__u32 seq;

		seq = KDP_READ_ONCE(s->seq);
		kdp_barrier();
		if ((seq & 1) || !ct_key_is(&s->key, w[0], w[1], w[2], w[3]))
			continue;
		*out = s->e;
		kdp_barrier();
		if (KDP_READ_ONCE(s->seq) != seq || !out->last_seen)
			return NULL; /* rewritten meanwhile, or cleared */
		if (!lb_fresh(now, out->last_seen, ct_timeout_ns(cfg, out)))
			return NULL;
		return s;
	}
	return NULL;
}

/* ct_refresh moves an entry's last_seen at p, which the reader saw holding seen, to now; for
 * both tables. Not a plain store: the entry may have gone since the reader judged it live, and
 * its memory may hold something else. IPv4: the control plane may have cleared the slot
 * (maps.ctClearMapped zeroes key and entry, last_seen 0 = unused), and a store would give the
 * emptied slot a time stamp again, a ghost entry under a zero key that holds its slot and
 * counts as a live connection (maps.LB.ConnEntries) until it expires; ct_lookup returns no
 * entry with 0, so the swap never writes into a cleared slot. IPv6: the sweeper deletes expired
 * entries and the LRU hash evicts, and an LRU hash's deleted element is reused for the next new
 * key at once, without waiting for the readers that still hold it (no RCU grace period), so a
 * store could stamp another connection's entry, or one the control plane is writing; the swap
 * writes only while last_seen is still the one this reader judged. last_seen is a word of its
 * own, apart from the state word (ct_close), so the two swaps never meet. Within a tick of the
 * coarse clock now equals seen and nothing is written at all: an established connection's
 * frames mostly leave the entry's cache line alone, where a plain store dirtied it on every
 * frame. */
static __always_inline void ct_refresh(__u64 *p, __u64 seen, __u64 now)
{
	if (seen != now)
		__sync_val_compare_and_swap(p, seen, now);
}

/* ct_close: a connection's FIN or RST moves its entry's state to KDP_CT_TCP_FIN in place, without
 * claiming the slot (readers do not), and the original direction's moves its real server's
 * count from active to inactive (kdp_lb_conns). Not a plain store of the state byte: two CPUs
 * seeing a FIN or RST of one connection at once would both move the count (active would
 * undercount, which lc/wlc and their kin schedule by), and a store racing the slot's reuse by
 * another CPU (or its clearing by the control plane) would mark the new entry closing. The
 * state is swapped in the entry's aligned 8-byte word that holds it, from the word as the
 * reader saw it (ct_lookup's copy; for IPv6's LRU hash, one read of the value), and only the
 * CPU whose swap won moves the count. The word holds the state with fields that only a write
 * of the whole entry changes (IPv4: real server address, port and flags; IPv6: port, flags
 * and real server id), so a rewritten or cleared entry fails the swap unless it holds the
 * same values, which only the same connection's entry does. */
#define KDP_CT_WORD_SHIFT(type, word)                                                                     \
	((__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__                                                        \
		  ? (__builtin_offsetof(type, state) - __builtin_offsetof(type, word))                       \
		  : (7 - (__builtin_offsetof(type, state) - __builtin_offsetof(type, word)))) *              \
	 8)
#define KDP_CT_STATE_SHIFT KDP_CT_WORD_SHIFT(struct ct_entry, addr)
#define KDP_CT6_STATE_SHIFT KDP_CT_WORD_SHIFT(struct ct6_entry, port)
_Static_assert(__builtin_offsetof(struct ct_slot, e.addr) % 8 == 0 && sizeof(struct ct_slot) % 8 == 0,
	       "the IPv4 entry's state word is 8-byte aligned in every slot");
_Static_assert(__builtin_offsetof(struct ct_entry, state) - __builtin_offsetof(struct ct_entry, addr) < 8,
	       "the IPv4 entry's state word holds its state");
_Static_assert(__builtin_offsetof(struct ct6_entry, port) % 8 == 0 &&
		       __builtin_offsetof(struct ct6_entry, state) - __builtin_offsetof(struct ct6_entry, port) < 8,
	       "the IPv6 entry's state word is 8-byte aligned and holds its state");

/* ct_state_of is the state in an entry's state word w (shift: KDP_CT_STATE_SHIFT or
 * KDP_CT6_STATE_SHIFT). */
static __always_inline __u8 ct_state_of(__u64 w, int shift)
{
	return (__u8)(w >> shift);
}

/* ct_close closes an entry on its connection's FIN or RST (see above): when seen, the state
 * word at p as the reader saw it, holds KDP_CT_TCP_EST, it swaps the word to the same one with
 * KDP_CT_TCP_FIN, and when this CPU's swap did it, moves real server backend's count from
 * active to inactive. Every other CPU (its swap lost, or it saw the entry closed already)
 * moves nothing. backend 0 (no real server has id 0) moves no count: the reply direction's
 * entry, whose closing only shortens its timeout. The caller tests the frame's flags, so an
 * established connection's other frames do not come here. */
static __always_inline void ct_close(__u64 *p, __u64 seen, int shift, __u32 backend)
{
	__u64 fin = (seen & ~(0xffULL << shift)) | ((__u64)KDP_CT_TCP_FIN << shift);
	struct lb_conns *cn;

	if (ct_state_of(seen, shift) != KDP_CT_TCP_EST || __sync_val_compare_and_swap(p, seen, fin) != seen ||
	    !backend)
		return;
	cn = lb_conns_of(backend);
	if (cn) {
		__sync_fetch_and_add(&cn->active, -1);
		__sync_fetch_and_add(&cn->inactive, 1);
	}
}

/* ct_touch is what a frame of a live connection does to its entry, in either table and
 * direction: it refreshes last_seen at ls, which the reader judged the entry by when it held
 * seen (ct_refresh), and on a FIN or RST in tcpflags closes it (ct_close) through its state
 * word at sw, as the reader saw it at seen_sw: in the IPv4 reader's copy of the entry
 * (ct_lookup copied it whole, behind a compiler barrier), or sw itself for IPv6's LRU hash,
 * whose word is then read once, and only for such a frame. backend: the real server whose
 * count moves, 0 for a reply entry. */
static __always_inline void ct_touch(__u8 tcpflags, __u64 *ls, __u64 seen, __u64 now, __u64 *sw,
				     const __u64 *seen_sw, int shift, __u32 backend)
{
	ct_refresh(ls, seen, now);
	if (tcpflags & (KDP_TCP_FIN | KDP_TCP_RST))
		ct_close(sw, KDP_READ_ONCE(*seen_sw), shift, backend);
}

/* lb_ct6_live is ct_lookup for IPv6's LRU hash: the entry of k if it is live at now, with
 * the last_seen it was judged by in *seen (for ct_refresh), else NULL (an expired entry stays
 * until the sweeper deletes it). */
static __always_inline struct ct6_entry *lb_ct6_live(const struct config *cfg, __u64 now, const struct ct6_key *k,
						     __u64 *seen)
{
	struct ct6_entry *e = bpf_map_lookup_elem(&kdp_lb_ct6, k);

	if (!e)
		return NULL;
	*seen = KDP_READ_ONCE(e->last_seen);
	if (!lb_fresh(now, *seen, ct_state_timeout_ns(cfg, e->state)))
		return NULL;
	return e;
}

/* ct_is_orig says whether slot s holds an entry (expired or not) of original key k. */
static __always_inline bool ct_is_orig(const struct ct_slot *s, const struct ct_key *k)
{
	const __u32 *x = (const __u32 *)&s->key, *y = (const __u32 *)k;

	return s->e.last_seen && x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

/* ct_is_reply says whether slot s holds an entry (expired or not) of the reply key of the
 * connection of original key k and entry v (as ct_insert makes it). */
static __always_inline bool ct_is_reply(const struct ct_slot *s, const struct ct_key *k, const struct ct_entry *v)
{
	const __u32 *x = (const __u32 *)&s->key;

	return s->e.last_seen && x[0] == v->addr && x[1] == k->saddr &&
	       x[2] == ((__u32)v->port | (__u32)k->sport << 16) && x[3] == ((__u32)k->proto | 1U << 8);
}

/* ct_slot_spare says whether slot s is free or its entry expired at now. */
static __always_inline bool ct_slot_spare(const struct config *cfg, const struct ct_slot *s, __u64 now)
{
	__u64 seen = s->e.last_seen;

	return !seen || !lb_fresh(now, seen, ct_timeout_ns(cfg, &s->e));
}

/* ct_pick chooses the pair of slots of bucket b for a new connection of original key k and
 * entry v (its reply key is made from both, as ct_insert makes it): the pair holding either
 * key (expired, or the new entries would be their keys' second ones; a reply key can recur
 * when one guest port reaches two services that share a real server, and the later
 * connection takes the earlier one's place, as its reply entry did before), else the first
 * pair whose two slots are free or expired, else the pair whose newer entry is the oldest
 * (maps.ctPick is the same rule for the control plane's writes). A global function of its own
 * (verified once), which calls no helper and so needs little stack: the new-connection
 * path's stack is near the programs' limit (the keys are compared through k and v, not held). */
__attribute__((noinline)) int ct_pick(const struct config *cfg, struct ct_bucket *b, const struct ct_key *k,
				      const struct ct_entry *v, __u64 now)
{
	__u64 oldest = 0;
	int p, victim = 0, spare = -1;

	if (!cfg || !b || !k || !v)
		return 0;
#pragma unroll
	for (p = 0; p < KDP_CT_CONNS; p++) {
		const struct ct_slot *so = &b->s[p], *sr = &b->s[p + KDP_CT_CONNS];
		__u64 newer;

		if (ct_is_orig(so, k) || ct_is_reply(sr, k, v))
			return p;
		if (spare < 0 && ct_slot_spare(cfg, so, now) && ct_slot_spare(cfg, sr, now))
			spare = p;
		newer = so->e.last_seen;
		if ((__s64)(sr->e.last_seen - newer) > 0)
			newer = sr->e.last_seen;
		if (p == 0 || (__s64)(newer - oldest) < 0) {
			victim = p;
			oldest = newer;
		}
	}
	return spare >= 0 ? spare : victim;
}

/* ct_claim claims slot s for a write (seq from even to odd) and says whether it did. */
static __always_inline bool ct_claim(struct ct_slot *s)
{
	__u32 seq = KDP_READ_ONCE(s->seq);

	if (KDP_LB_COST_SKIP(KDP_COST_CLAIM)) {
		s->seq = seq + 1;
		return !(seq & 1);
	}
	return !(seq & 1) && __sync_val_compare_and_swap(&s->seq, seq, seq + 1) == seq;
}

/* ct_publish publishes slot s, claimed by ct_claim (seq from odd to even). */
static __always_inline void ct_publish(struct ct_slot *s)
{
	if (KDP_LB_COST_SKIP(KDP_COST_CLAIM))
		s->seq += 1;
	else
		__sync_fetch_and_add(&s->seq, 1);
}

/* ct_insert writes a new connection's two entries (see above) into the pair of slots ct_pick
 * chooses in its bucket: the original direction's, k -> v, and the reply direction's (real
 * server -> guest, holding the VIP), made from the same two in place, so that neither the
 * reply's key nor its entry takes room on the caller's stack. The reply's is published first:
 * a frame that finds the original entry finds the reply's too. A CPU that loses either slot
 * to another one writing it at the same moment gives both up (the reply's slot unwritten,
 * its seq moved by two): the connection's next frame looks again. */
static __always_inline void ct_insert(const struct config *cfg, const struct ct_key *k, const struct ct_entry *v,
				      __u64 now)
{
	const __u32 *kw = (const __u32 *)k;
	struct ct_bucket *b = ct_bucket(kw[0], kw[1], kw[2], kw[3], 0);
	struct ct_slot *so, *sr;
	__u32 *sk;
	int p;

	if (!b)
		return;
	p = KDP_LB_COST_SKIP(KDP_COST_PICK) ? 0 : ct_pick(cfg, b, k, v, now) & (KDP_CT_CONNS - 1);
	so = &b->s[p];
	sr = &b->s[p + KDP_CT_CONNS];
	if (!ct_claim(sr))
		return;
	if (!ct_claim(so)) {
		ct_publish(sr);
		return;
	}
	sk = (__u32 *)&sr->key;
	sk[0] = v->addr;
	sk[1] = k->saddr;
	sk[2] = (__u32)v->port | (__u32)k->sport << 16;
	sk[3] = (__u32)k->proto | 1U << 8;
	sr->e = *v;
	sr->e.addr = k->daddr;
	sr->e.port = k->dport;
	ct_publish(sr);
	sk = (__u32 *)&so->key;
	sk[0] = kw[0];
	sk[1] = kw[1];
	sk[2] = kw[2];
	sk[3] = kw[3];
	so->e = *v;
	ct_publish(so);
}

/* sh_hash is ip_vs_sh_hashkey for IPv4 without the port flag: hash_32(ntohl(addr), 8). */
static __always_inline __u32 sh_hash(__be32 addr)
{
	return (bpf_ntohl(addr) * 0x61C88647U) >> 24;
}

/* dh_hash is ip_vs_dh_hashkey for IPv4: (ntohl(addr) * 2654435761) & 0xff. */
static __always_inline __u32 dh_hash(__be32 addr)
{
	return (bpf_ntohl(addr) * 2654435761U) & 0xff;
}

/* svc_slot is slot idx (0-based) of the service of master m, whose slot blocks are keyed under
 * base: in m itself below KDP_LB_INLINE, else in its block (one lookup), or NULL. */
static __always_inline const struct lb_slot *svc_slot(const struct lb_svc_key *base, const struct lb_svc *m,
						      __u32 idx)
{
	struct lb_svc_key k;
	struct lb_svc *b;

	/* Hidden from clang, which would drop the masks below where it knows idx's range (a
	 * 64-bit remainder it knows fits in 32 bits, which the verifier does not). */
	asm volatile("" : "+r"(idx));
	if (idx < KDP_LB_INLINE)
		return &m->s[idx & (KDP_LB_INLINE - 1)];
	k = *base;
	k.slot = (m->rev << 16) | ((idx / KDP_LB_INLINE) & 0xffff);
	b = bpf_map_lookup_elem(&kdp_lb_svc, &k);
	if (!b)
		return NULL;
	/* After the check: clang would offset the pointer before it, which the verifier refuses
	 * on a pointer that may be NULL. */
	asm volatile("" : "+r"(b));
	return &b->s[idx & (KDP_LB_INLINE - 1)];
}

/* The schedulers' bpf_loop callbacks read the master through a pointer in their context (the
 * verifier follows a map value pointer spilled to the caller's stack), not a copy: its slots
 * would take 96 bytes of a stack that is near its limit. */
struct lc_scan {
	struct lb_svc_key mk; /* the key base of the service's slot blocks */
	const struct lb_svc *m;
	__u32 count;
	__u8 sched;
	__u32 best;    /* id of the best real server so far, 0 = none */
	__u64 best_oh; /* its overhead */
	__u32 best_w;  /* its weight */
};

/* lc_step looks at the i-th real server (bpf_loop callback: verified once, not per index). */
static long lc_step(__u64 i, void *arg)
{
	struct lc_scan *s = arg;
	struct lb_backend *be;
	struct lb_conns *st;
	const struct lb_slot *sl;
	__u64 oh, active;
	__u32 w;

	if (i >= s->count)
		return 1;
	sl = svc_slot(&s->mk, s->m, i);
	if (!sl || !sl->id)
		return 0;
	be = bpf_map_lookup_elem(&kdp_lb_be, &sl->id);
	if (!be || be->weight == 0)
		return 0;
	st = lb_conns_of(sl->id);
	active = st && st->active > 0 ? st->active : 0;
	w = be->weight;
	if (s->sched == KDP_SCHED_SED || s->sched == KDP_SCHED_NQ) {
		oh = active + 1;
		if (s->sched == KDP_SCHED_NQ && oh == 1) {
			s->best = sl->id; /* an idle server wins at once */
			return 1;
		}
	} else {
		oh = (active << 8) + (st && st->inactive > 0 ? st->inactive : 0);
		if (s->sched == KDP_SCHED_LC)
			w = 1;
	}
	/* oh/w < best_oh/best_w, cross-multiplied as IPVS does; ties keep the earlier server,
	 * so kernel order (newest first) breaks them. */
	if (!s->best || oh * s->best_w < s->best_oh * w) {
		s->best = sl->id;
		s->best_oh = oh;
		s->best_w = w;
	}
	return 0;
}

/* wrr_walk is IPVS's wrr state machine (ip_vs_wrr_schedule) over a service's real servers in
 * kernel order: pos is the cursor (-1: the list head), cw the current weight. */
struct wrr_walk {
	struct lb_svc_key mk; /* the key base of the service's slot blocks */
	const struct lb_svc *m;
	__u32 count;
	__s32 mw;
	__s32 pos;
	__s32 cw;
	__u32 pick;
	__be32 addr; /* the pick's address and port when its slot has them, else 0 */
	__be16 port;
};

/* wrr_step advances the cursor by one server (bpf_loop callback). Every pass over the list
 * finds the largest weight, so a pick takes at most 2 * count + 2 steps. */
static long wrr_step(__u64 i, void *arg)
{
	struct wrr_walk *w = arg;
	const struct lb_slot *sl;

	w->pos++;
	if (w->pos >= (__s32)w->count) {
		w->pos = -1;
		if (--w->cw <= 0)
			w->cw = w->mw;
		return 0;
	}
	sl = svc_slot(&w->mk, w->m, w->pos);
	if (sl && sl->id && (__s32)sl->weight >= w->cw) {
		w->pick = sl->id;
		w->addr = sl->addr;
		w->port = sl->port;
		return 1;
	}
	return 0;
}

/* wrr_schedule runs one wrr pick. The state lives in the service's counters (sched): rev << 32 |
 * (cw - 1) << 16 | (pos + 1), so zero is the state a new service starts from (cursor at the
 * head, cw 1: the kernel's after servers were added one by one) and a revision change (an
 * edit) starts again from it. Concurrent picks on other CPUs are settled with a compare and
 * swap; a pick that loses twice keeps its server (two connections then share one slot of the
 * interleave, as in any approximation under contention). */
static __always_inline __u32 wrr_schedule(const struct lb_svc_key *mk, const struct lb_svc *m, struct lb_stats *ss,
					   struct ct_entry *pick)
{
	struct wrr_walk w = { .mk = *mk, .m = m, .count = m->count, .mw = m->wmax };
	__u64 old, next;
	int try;

	if (!m->count || !m->wmax)
		return 0;
	for (try = 0; try < 3; try++) {
		old = ss->sched;
		w.pos = -1;
		w.cw = 1;
		if ((__u32)(old >> 32) == (m->rev & 0xffff)) {
			w.pos = (__s32)(old & 0xffff) - 1;
			w.cw = (__s32)((old >> 16) & 0xffff) + 1;
		}
		if (w.cw > w.mw)
			w.cw = w.mw;
		w.pick = 0;
		bpf_loop(2 * w.count + 2, wrr_step, &w, 0);
		if (!w.pick)
			return 0;
		next = (__u64)(m->rev & 0xffff) << 32 | (__u64)((w.cw - 1) & 0xffff) << 16 | (__u64)((w.pos + 1) & 0xffff);
		if (__sync_val_compare_and_swap(&ss->sched, old, next) == old)
			break;
	}
	if (pick) {
		pick->addr = w.addr;
		pick->port = w.port;
	}
	return w.pick;
}

/* lb_slot_take is the real server of slot sl (0 for none), whose address and port, when the slot
 * carries them, go to pick's (see lb_schedule). */
static __always_inline __u32 lb_slot_take(const struct lb_slot *sl, struct ct_entry *pick)
{
	if (!sl)
		return 0;
	if (pick) {
		pick->addr = sl->addr;
		pick->port = sl->port;
	}
	return sl->id;
}

/* lb_random_slot schedules a new connection of an rr or wrr service m whose counters, where
 * their position lives, are not claimed (see lb_cnt_slot: between an upgrade's migration and
 * its first sync, or an older table's ids that share an entry): a random slot rather than no
 * server; for wrr one of weight > 0 (0 when the draw hits another), as rr's slots are. */
static __always_inline __u32 lb_random_slot(const struct lb_svc_key *mk, const struct lb_svc *m,
					     struct ct_entry *pick)
{
	const struct lb_slot *sl;

	if (!m->count)
		return 0;
	sl = svc_slot(mk, m, bpf_get_prandom_u32() % m->count);
	if (sl && m->sched == KDP_SCHED_WRR && !sl->weight)
		return 0;
	return lb_slot_take(sl, pick);
}

/* lb_schedule picks a real server for a new connection of service m (0 if none can take it);
 * mk is the key base of its slot blocks (and bucket table). ss is the service's counters (rr
 * and wrr keep their position there), looked up once by the caller, which counts the
 * connection in them too. When the picked slot carries the real server's address and port
 * they are written to pick's addr and port (IPv4 callers; pick NULL for IPv6), which the
 * caller has zeroed. */
static __always_inline __u32 lb_schedule(const struct lb_svc_key *mk, const struct lb_svc *m, struct lb_stats *ss,
					 __be32 saddr, __be32 daddr, __u64 now, struct ct_entry *pick)
{
	struct aff_key ak = { .svc = m->id | 0x80000000U, .addr = daddr };
	__u8 sched = m->sched; /* of the scan: lblc/lblcr scan as wlc */
	__u32 idx;

	switch (m->sched) {
	case KDP_SCHED_RR:
	case KDP_SCHED_WRR:
		if (!ss)
			return lb_random_slot(mk, m, pick);
		if (m->sched == KDP_SCHED_WRR)
			return wrr_schedule(mk, m, ss, pick);
		if (!m->count)
			return 0;
		return lb_slot_take(svc_slot(mk, m, __sync_fetch_and_add(&ss->sched, 1) % m->count), pick);
	case KDP_SCHED_SH:
	case KDP_SCHED_DH: {
		struct lb_svc_key hk = *mk;
		struct lb_hash *h;

		hk.slot = m->rev << 16;
		h = bpf_map_lookup_elem(&kdp_lb_hash, &hk);
		if (!h)
			return 0;
		idx = (m->sched == KDP_SCHED_SH ? sh_hash(saddr) : dh_hash(daddr)) & (KDP_LB_HASH_BUCKETS - 1);
		return h->be[idx];
	}
	case KDP_SCHED_LBLC:
	case KDP_SCHED_LBLCR: {
		struct aff_entry *ae = bpf_map_lookup_elem(&kdp_lb_aff, &ak);

		if (ae) {
			struct lb_backend *be = bpf_map_lookup_elem(&kdp_lb_be, &ae->backend);
			struct lb_conns *st = lb_conns_of(ae->backend);

			/* Keep the locality unless the server is gone, quiesced or overloaded
			 * (more active connections than its weight, as ip_vs_lblc does). */
			if (be && be->weight && (!st || st->active <= be->weight)) {
				ae->last_seen = now;
				return ae->backend;
			}
		}
		sched = KDP_SCHED_WLC;
		break;
	}
	}
	if (!m->count)
		return 0;
	/* The scan's state lives from here on only, so the compiler can give its stack to wrr's
	 * walk above: Linux 6.1's verifier counts the bpf_loop callback's frame on top of the
	 * caller's, and the IPv6 path must stay within 512 bytes there. */
	struct lc_scan scan = { .mk = *mk, .m = m, .count = m->count, .sched = sched };

	bpf_loop(KDP_LB_MAX_SCAN, lc_step, &scan, 0);
	if (scan.best && (m->sched == KDP_SCHED_LBLC || m->sched == KDP_SCHED_LBLCR)) {
		struct aff_entry ne = { .last_seen = now, .backend = scan.best };

		bpf_map_update_elem(&kdp_lb_aff, &ak, &ne, BPF_ANY);
	}
	return scan.best;
}

#define KDP_IP6_SADDR_OFF (ETH_HLEN + 8)
#define KDP_IP6_DADDR_OFF (ETH_HLEN + 24)

/* fold6 is an IPv6 address folded to one word as IPVS folds it for its sh and dh hashes (the
 * XOR of its four words). */
static __always_inline __be32 fold6(const __be32 *a)
{
	return a[0] ^ a[1] ^ a[2] ^ a[3];
}

/* ctx_rewrite16 replaces the 16-byte address at off (in the IPv6 header, which has no
 * checksum of its own) word by word, fixing the L4 checksum at l4_csum_off through the pseudo
 * header. */
static __always_inline int ctx_rewrite16(void *ctx, __u32 off, const __be32 *from, const __be32 *to,
					 __u32 l4_csum_off, const bool xdp)
{
	int i;

	if (!xdp) {
		struct __sk_buff *skb = ctx;

#pragma unroll
		for (i = 0; i < 4; i++)
			if (from[i] != to[i] &&
			    bpf_l4_csum_replace(skb, l4_csum_off, from[i], to[i], BPF_F_PSEUDO_HDR | 4))
				return -1;
		return bpf_skb_store_bytes(skb, off, to, 16, 0);
	} else {
		struct xdp_md *x = ctx;
		void *data = (void *)(long)x->data, *end = (void *)(long)x->data_end;
		__u32 *field = data + (off & 0xff);
		__sum16 *l4c = data + (l4_csum_off & 0x3ff);

		if ((void *)(field + 4) > end || (void *)(l4c + 1) > end)
			return -1;
#pragma unroll
		for (i = 0; i < 4; i++) {
			csum_replace(l4c, from[i], to[i], 4);
			field[i] = to[i];
		}
		return 0;
	}
}

/* ctx_rewrite2_6 is ctx_rewrite2 for an L4 header up to KDP_IPV6_MAX_L4_OFF deep. */
static __always_inline int ctx_rewrite2_6(void *ctx, __u32 off, __u16 from, __u16 to, __u32 l4_csum_off,
					  const bool xdp)
{
	if (!xdp) {
		struct __sk_buff *skb = ctx;

		if (bpf_l4_csum_replace(skb, l4_csum_off, from, to, 2))
			return -1;
		return bpf_skb_store_bytes(skb, off, &to, 2, 0);
	} else {
		struct xdp_md *x = ctx;
		void *data = (void *)(long)x->data, *end = (void *)(long)x->data_end;
		__u16 *field = data + (off & 0x3ff);
		__sum16 *l4c = data + (l4_csum_off & 0x3ff);

		if ((void *)(field + 1) > end || (void *)(l4c + 1) > end)
			return -1;
		csum_replace(l4c, from, to, 2);
		*field = to;
		return 0;
	}
}

/* lb_dnat6 rewrites the destination of the guest's IPv6 frame f to new_a:new_p on the linear
 * data with one combined update of the L4 checksum (csum.h), or through the helpers where the
 * skb does not allow that. Returns 0, or -1 when the rewrite failed. */
static __always_inline int lb_dnat6(void *ctx, const bool xdp, const struct flow *f, const __be32 *new_a,
				    __be16 new_p, bool udp)
{
	__u32 l4_off = f->l4_off & KDP_IPV6_MAX_L4_OFF;
	int mode = ctx_direct_csum(ctx, xdp);
	int i;

	if (mode >= 0) {
		void *data = ctx_data(ctx, xdp), *end = ctx_data_end(ctx, xdp);
		__be32 *a = data + KDP_IP6_DADDR_OFF;
		__u8 *l4 = data + l4_off;
		__sum16 *l4c = (void *)(l4 + (udp ? 6 : 16));

		if ((void *)(a + 4) <= end && (void *)(l4c + 1) <= end) {
			__be16 *port = (void *)(l4 + 2);
			__u32 da = 0, dp = 0;

#pragma unroll
			for (i = 0; i < 4; i++)
				if (a[i] != new_a[i])
					da += csum_diff4(a[i], new_a[i]);
			if (*port != new_p)
				dp = csum_diff2(*port, new_p);
			csum_l4_update(l4c, da, dp, mode, false);
#pragma unroll
			for (i = 0; i < 4; i++)
				a[i] = new_a[i];
			*port = new_p;
			return 0;
		}
	}
	if (xdp)
		return -1;
	if (ctx_rewrite16(ctx, KDP_IP6_DADDR_OFF, f->daddr.v6, new_a, l4_off + (udp ? 6 : 16), false))
		return -1;
	if (new_p != f->dport && ctx_rewrite2_6(ctx, l4_off + 2, f->dport, new_p, l4_off + (udp ? 6 : 16), false))
		return -1;
	return 0;
}

/* lb_dnat4 rewrites the destination of the guest's IPv4 frame f to new_a:new_p on the linear
 * data with one combined checksum update, folded into the IP and the L4 checksum (csum.h), or
 * through the helpers where the skb does not allow that. Only the guest-side programs use it:
 * a tc program that writes packet data directly gets the verifier's un-clone prologue, which
 * costs nothing on the fresh skbs a tap makes of the guest's frames, but would copy the
 * headers of every cloned skb the host's stack sends (the reverse NAT, lb_to_guest, keeps the
 * helpers). Returns 0, or -1 when the rewrite failed. */
static __always_inline int lb_dnat4(void *ctx, const bool xdp, const struct flow *f, __be32 new_a, __be16 new_p,
				    bool udp)
{
	__u32 csum_off = f->l4_off + (udp ? 6 : 16);
	int mode;

	if (new_a == f->daddr.v4 && new_p == f->dport)
		return 0;
	mode = ctx_direct_csum(ctx, xdp);
	if (mode >= 0) {
		void *data = ctx_data(ctx, xdp), *end = ctx_data_end(ctx, xdp);
		struct iphdr *ip = data + ETH_HLEN;
		__u8 *l4 = data + (f->l4_off & 0xff);
		__sum16 *l4c = (void *)(l4 + (udp ? 6 : 16));

		if ((void *)(ip + 1) <= end && (void *)(l4c + 1) <= end) {
			__be16 *port = (void *)(l4 + 2);
			__u32 da = 0, dp = 0;

			if (ip->daddr != new_a) {
				da = csum_diff4(ip->daddr, new_a);
				ip->check = csum_apply(ip->check, da);
			}
			if (*port != new_p)
				dp = csum_diff2(*port, new_p);
			csum_l4_update(l4c, da, dp, mode, udp);
			ip->daddr = new_a;
			*port = new_p;
			return 0;
		}
	}
	if (xdp)
		return -1;
	if (new_a != f->daddr.v4 &&
	    ctx_rewrite4(ctx, KDP_IP_DADDR_OFF, f->daddr.v4, new_a, KDP_IP_CSUM_OFF, csum_off, udp, false))
		return -1;
	if (new_p != f->dport && ctx_rewrite2(ctx, f->l4_off + 2, f->dport, new_p, csum_off, udp, false))
		return -1;
	return 0;
}

/* lb_from_guest6 is lb_from_guest for IPv6 TCP and UDP (f has its ports). UDP over IPv6 always
 * carries a checksum, so there is no "zero means none" case. */
static __always_inline int lb_from_guest6(void *ctx, const bool xdp, const struct config *cfg, __u32 len,
					  struct flow *f)
{
	__u32 zero = 0, be_id = 0;
	struct lb6_scratch *sc = bpf_map_lookup_elem(&kdp_lb6_scratch, &zero);
	struct ct6_entry *e;
	struct lb_svc *m;
	struct lb_stats *st, *ss;
	struct lb_conns *cn;
	__u64 now = lb_now(), seen;
	bool udp = f->proto == IPPROTO_UDP;
	int i;

	if (!sc)
		return -1;
	__builtin_memset(&sc->ck, 0, sizeof(sc->ck));
	__builtin_memcpy(sc->ck.saddr, f->saddr.v6, 16);
	__builtin_memcpy(sc->ck.daddr, f->daddr.v6, 16);
	sc->ck.sport = f->sport;
	sc->ck.dport = f->dport;
	sc->ck.proto = f->proto;
	e = lb_ct6_live(cfg, now, &sc->ck, &seen);
	if (e) {
		ct_touch(f->tcpflags, &e->last_seen, seen, now, (__u64 *)&e->port, (const __u64 *)&e->port,
			 KDP_CT6_STATE_SHIFT, e->backend);
		sc->ne = *e;
		lb_count(KDP_LB_STATS_BACKEND, sc->ne.backend, true, len);
		lb_count(KDP_LB_STATS_SVC, sc->ne.svc, true, len);
		goto nat;
	}

	__builtin_memset(&sc->mk, 0, sizeof(sc->mk));
	__builtin_memcpy(sc->mk.vip, f->daddr.v6, 16);
	sc->mk.vport = f->dport;
	sc->mk.proto = f->proto;
	sc->mk.gen = cfg->lb_gen;
	m = bpf_map_lookup_elem(&kdp_lb_svc6, &sc->mk);
	if (!m)
		return -1; /* not a service (and no connection): not ours */
	__builtin_memset(&sc->base, 0, sizeof(sc->base));
	sc->base.vip = m->id;
	sc->base.proto = KDP_LB_V6_SLOTS;
	sc->base.gen = cfg->lb_gen;

	/* Persistence: the client's template (its address under the service's prefix length). */
	__builtin_memset(&sc->ak, 0, sizeof(sc->ak));
	sc->ak.svc = m->id;
	if (m->persist) {
		struct aff_entry *ae;
		__u32 bits = m->pmask;

#pragma unroll
		for (i = 0; i < 4; i++) {
			__u32 w = bits >= 32 ? 0xffffffffU : bits == 0 ? 0 : ~(0xffffffffU >> bits);

			sc->ak.addr[i] = f->saddr.v6[i] & bpf_htonl(w);
			bits = bits >= 32 ? bits - 32 : 0;
		}
		ae = bpf_map_lookup_elem(&kdp_lb_aff6, &sc->ak);
		if (ae && lb_fresh(now, ae->last_seen, (__u64)m->persist * 1000000000ULL) &&
		    bpf_map_lookup_elem(&kdp_lb_be6, &ae->backend))
			be_id = ae->backend;
	}
	ss = lb_stats_of(KDP_LB_STATS_SVC, m->id);
	if (!be_id)
		be_id = lb_schedule(&sc->base, m, ss, fold6(f->saddr.v6), fold6(f->daddr.v6), now, NULL);
	if (m->persist && be_id) {
		sc->na.last_seen = now;
		sc->na.backend = be_id;
		sc->na.pad = 0;
		bpf_map_update_elem(&kdp_lb_aff6, &sc->ak, &sc->na, BPF_ANY);
	}
	{
		struct lb_backend6 *be = be_id ? bpf_map_lookup_elem(&kdp_lb_be6, &be_id) : NULL;

		if (!be)
			return KDP_DROP_LB_NO_BACKEND;
		__builtin_memset(&sc->ne, 0, sizeof(sc->ne));
		sc->ne.last_seen = now;
		__builtin_memcpy(sc->ne.addr, be->ip, 16);
		sc->ne.port = be->port;
		sc->ne.state = udp ? KDP_CT_UDP : KDP_CT_TCP_EST;
		if (!udp && (f->tcpflags & (KDP_TCP_FIN | KDP_TCP_RST)))
			sc->ne.state = KDP_CT_TCP_FIN;
		sc->ne.backend = be_id;
		sc->ne.svc = m->id;
		KDP_LB_NEW_CONN(ctx, xdp, len, f, be->ip, be->port, true);

		__builtin_memset(&sc->rk, 0, sizeof(sc->rk));
		__builtin_memcpy(sc->rk.saddr, be->ip, 16);
		__builtin_memcpy(sc->rk.daddr, f->saddr.v6, 16);
		sc->rk.sport = be->port;
		sc->rk.dport = f->sport;
		sc->rk.proto = f->proto;
		sc->rk.dir = 1;
		sc->re = sc->ne;
		__builtin_memcpy(sc->re.addr, f->daddr.v6, 16);
		sc->re.port = f->dport;
	}
	bpf_map_update_elem(&kdp_lb_ct6, &sc->rk, &sc->re, BPF_ANY);
	bpf_map_update_elem(&kdp_lb_ct6, &sc->ck, &sc->ne, BPF_ANY);
	/* The new connection's counters, in the entries looked up once. */
	st = lb_stats_of(KDP_LB_STATS_BACKEND, be_id);
	if (st)
		__sync_fetch_and_add(&st->conns, 1);
	lb_count_in(st, len);
	cn = lb_conns_of(be_id);
	if (cn) {
		if (sc->ne.state == KDP_CT_TCP_EST)
			__sync_fetch_and_add(&cn->active, 1);
		else
			__sync_fetch_and_add(&cn->inactive, 1);
	}
	if (ss)
		__sync_fetch_and_add(&ss->conns, 1);
	lb_count_in(ss, len);

nat:
	if (lb_dnat6(ctx, xdp, f, sc->ne.addr, sc->ne.port, udp))
		return KDP_DROP_LB_REWRITE;
	__builtin_memcpy(f->daddr.v6, sc->ne.addr, 16);
	f->dport = sc->ne.port;
	return -1;
}

/* lb_to_guest6 is lb_to_guest for IPv6. */
static __always_inline int lb_to_guest6(void *ctx, const bool xdp, const struct config *cfg, __u32 len,
					struct flow *f)
{
	__u32 zero = 0;
	struct lb6_scratch *sc = bpf_map_lookup_elem(&kdp_lb6_scratch, &zero);
	struct ct6_entry *e;
	__be32 vip[4];
	__be16 vport;
	__u32 csum_off;
	__u64 now, seen;
	bool udp = f->proto == IPPROTO_UDP;

	if (!sc)
		return -1;
	__builtin_memset(&sc->ck, 0, sizeof(sc->ck));
	__builtin_memcpy(sc->ck.saddr, f->saddr.v6, 16);
	__builtin_memcpy(sc->ck.daddr, f->daddr.v6, 16);
	sc->ck.sport = f->sport;
	sc->ck.dport = f->dport;
	sc->ck.proto = f->proto;
	sc->ck.dir = 1;
	now = lb_now();
	e = lb_ct6_live(cfg, now, &sc->ck, &seen);
	if (!e)
		return -1;
	ct_touch(f->tcpflags, &e->last_seen, seen, now, (__u64 *)&e->port, (const __u64 *)&e->port,
		 KDP_CT6_STATE_SHIFT, 0); /* the reply entry: no count */
	__builtin_memcpy(vip, e->addr, 16);
	vport = e->port;
	lb_count(KDP_LB_STATS_BACKEND, e->backend, false, len);
	lb_count(KDP_LB_STATS_SVC, e->svc, false, len);
	csum_off = (f->l4_off & KDP_IPV6_MAX_L4_OFF) + (udp ? 6 : 16);
	if (ctx_rewrite16(ctx, KDP_IP6_SADDR_OFF, f->saddr.v6, vip, csum_off, xdp))
		return KDP_DROP_LB_REWRITE;
	if (vport != f->sport && ctx_rewrite2_6(ctx, f->l4_off & KDP_IPV6_MAX_L4_OFF, f->sport, vport, csum_off, xdp))
		return KDP_DROP_LB_REWRITE;
	return -1;
}

/* lb_active says whether the sandbox's load balancer has anything to do: when it has not, a frame
 * need not even be parsed for it. */
static __always_inline bool lb_active(const struct config *cfg)
{
	return cfg->flags & KDP_CFG_LB;
}

/* lb_from_guest4 is lb_from_guest for IPv4 TCP and UDP (f has its ports). */
static __always_inline int lb_from_guest4(void *ctx, const bool xdp, const struct config *cfg, __u32 len,
					  struct flow *f)
{
	struct lb_svc_key mk = {};
	struct ct_key ck = {};
	struct ct_entry ne;
	struct ct_slot *e;
	struct lb_svc *m;
	struct lb_stats *st, *ss;
	struct lb_conns *cn;
	__u64 now = lb_now();
	__u32 be_id = 0;
	bool udp = f->proto == IPPROTO_UDP;

	ck.saddr = f->saddr.v4;
	ck.daddr = f->daddr.v4;
	ck.sport = f->sport;
	ck.dport = f->dport;
	ck.proto = f->proto;
	if (KDP_LB_COST_SKIP(KDP_COST_CTMISS) && (f->tcpflags & KDP_TCP_SYN))
		e = NULL;
	else
		e = ct_lookup(cfg, now, &ck, 0, &ne);
	if (KDP_LB_COST_SKIP(KDP_COST_CTLOOKUP2) && e)
		e = ct_lookup(cfg, now, &ck, 0, &ne);
	if (KDP_LB_COST_STOP(KDP_STOP_LOOKUP))
		return -1;
	if (e) {
		if (!KDP_LB_COST_SKIP(KDP_COST_REFRESH))
			ct_touch(f->tcpflags, &e->e.last_seen, ne.last_seen, now, (__u64 *)&e->e.addr,
				 (const __u64 *)&ne.addr, KDP_CT_STATE_SHIFT, ne.backend);
		if (KDP_LB_COST_STOP(KDP_STOP_TOUCH))
			return -1;
		lb_count(KDP_LB_STATS_BACKEND, ne.backend, true, len);
		lb_count(KDP_LB_STATS_SVC, ne.svc, true, len);
		goto nat;
	}

	mk.vip = f->daddr.v4;
	mk.vport = f->dport;
	mk.proto = f->proto;
	mk.gen = cfg->lb_gen;
	m = bpf_map_lookup_elem(&kdp_lb_svc, &mk);
	if (KDP_LB_COST_SKIP(KDP_COST_MASTER2) && m)
		m = bpf_map_lookup_elem(&kdp_lb_svc, &mk);
	if (!m)
		return -1; /* not a service (and no connection): not ours */
	/* After a miss ne holds nothing or a copy that did not hold; lb_schedule's pick starts
	 * from zeros. */
	__builtin_memset(&ne, 0, sizeof(ne));
	if (KDP_LB_COST_STOP(KDP_STOP_MASTER))
		return -1;

	{
		/* Persistence: the client's template holds while its real server exists. */
		struct aff_key ak = { .svc = m->id, .addr = f->saddr.v4 & m->pmask };
		struct aff_entry *ae = NULL;

		if (m->persist) {
			ae = bpf_map_lookup_elem(&kdp_lb_aff, &ak);
			if (ae && lb_fresh(now, ae->last_seen, (__u64)m->persist * 1000000000ULL) &&
			    bpf_map_lookup_elem(&kdp_lb_be, &ae->backend))
				be_id = ae->backend;
		}
		ss = lb_stats_of(KDP_LB_STATS_SVC, m->id);
		if (!be_id)
			be_id = KDP_LB_COST_SKIP(KDP_COST_SCHED) ? lb_slot_take(&m->s[0], &ne) :
								   lb_schedule(&mk, m, ss, f->saddr.v4, f->daddr.v4, now, &ne);
		if (m->persist && be_id) {
			struct aff_entry na = { .last_seen = now, .backend = be_id };

			bpf_map_update_elem(&kdp_lb_aff, &ak, &na, BPF_ANY);
		}
	}
	if (KDP_LB_COST_STOP(KDP_STOP_SCHED))
		return -1;
	{
		if (!be_id)
			return KDP_DROP_LB_NO_BACKEND;
		if (!ne.addr) { /* not in the slot: persistence, sh/dh, the lc family */
			struct lb_backend *be = bpf_map_lookup_elem(&kdp_lb_be, &be_id);

			if (!be)
				return KDP_DROP_LB_NO_BACKEND;
			ne.addr = be->ip;
			ne.port = be->port;
		}
		ne.last_seen = now;
		ne.state = udp ? KDP_CT_UDP : KDP_CT_TCP_EST;
		if (!udp && (f->tcpflags & (KDP_TCP_FIN | KDP_TCP_RST)))
			ne.state = KDP_CT_TCP_FIN;
		ne.backend = be_id;
		ne.svc = m->id;

		if (!KDP_LB_COST_SKIP(KDP_COST_INSERT))
			ct_insert(cfg, &ck, &ne, now);
		if (KDP_LB_COST_STOP(KDP_STOP_INSERT))
			return -1;

		/* The new connection's counters, in the entries looked up once. */
		if (!KDP_LB_COST_SKIP(KDP_COST_COUNT)) {
			st = lb_stats_of(KDP_LB_STATS_BACKEND, be_id);
			if (st)
				lb_add(&st->conns, 1);
			lb_count_in(st, len);
			cn = lb_conns_of(be_id);
			if (cn) {
				if (ne.state == KDP_CT_TCP_EST)
					lb_add(&cn->active, 1);
				else
					lb_add(&cn->inactive, 1);
			}
			if (ss)
				lb_add(&ss->conns, 1);
			lb_count_in(ss, len);
		}
		if (!KDP_LB_COST_SKIP(KDP_COST_MON))
			KDP_LB_NEW_CONN(ctx, xdp, len, f, &ne.addr, ne.port, false);
	}

nat:
	if (KDP_LB_COST_STOP(KDP_STOP_NAT))
		return -1;
	if (!KDP_LB_COST_SKIP(KDP_COST_REWRITE) && lb_dnat4(ctx, xdp, f, ne.addr, ne.port, udp))
		return KDP_DROP_LB_REWRITE;
	f->daddr.v4 = ne.addr;
	f->dport = ne.port;
	return -1;
}

/* Each family's path is a BPF function of its own (with both inlined, the stack of the programs
 * with the schedulers' bpf_loop callbacks would pass 512 bytes), one per hook, so that the tc
 * programs call only skb helpers and the XDP programs none (kata-dp version reads the helpers
 * each program type needs from the object). */
#define LB_HOOK_FN(name, args, call)                                                              \
	static __noinline int name##_tc args { return call(false); }                              \
	static __noinline int name##_xdp args { return call(true); }

#define LB_FROM4(x) lb_from_guest4(ctx, x, cfg, len, f)
#define LB_FROM6(x) lb_from_guest6(ctx, x, cfg, len, f)
#define LB_TO6(x) lb_to_guest6(ctx, x, cfg, len, f)
LB_HOOK_FN(lb_from4, (void *ctx, const struct config *cfg, __u32 len, struct flow *f), LB_FROM4)
LB_HOOK_FN(lb_from6, (void *ctx, const struct config *cfg, __u32 len, struct flow *f), LB_FROM6)
LB_HOOK_FN(lb_to6, (void *ctx, const struct config *cfg, __u32 len, struct flow *f), LB_TO6)

/*
 * ICMP and ICMPv6 errors about load-balanced connections, translated as IPVS translates them
 * (ip_vs_in_icmp, ip_vs_out_icmp, ip_vs_nat_icmp): an error is about the packet it quotes, and
 * a NATed packet was seen with other addresses on the two sides of the load balancer. Without
 * the translation the guest's stack matches no socket to an error about guest -> real server
 * (connected UDP never sees ECONNREFUSED, TCP never lowers its path MTU), and the real server
 * none to one about VIP -> guest.
 *
 *   to the guest:   an error quoting guest -> real server of a connection (its reply entry)
 *                   quotes guest -> VIP:vport instead; an outer source that is the real server
 *                   becomes the VIP (a router on the way keeps its own address);
 *   from the guest: an error quoting VIP:vport -> guest (its original entry) quotes real
 *                   server -> guest instead; an outer destination that is the VIP becomes the
 *                   real server (and the flow with it, for strict egress).
 *
 * Every checksum the change touches is fixed incrementally: the quoted IPv4 header's, the
 * quoted TCP/UDP checksum when the quote holds it (IPv4 errors may quote only 8 bytes of the
 * L4 header), and the ICMP checksum over all of them (ICMPv6's also over the outer addresses,
 * through its pseudo header). Only errors (destination unreachable incl. fragmentation needed
 * and packet too big, source quench, time exceeded, parameter problem) are looked into; an
 * error quoting anything but unfragmented TCP/UDP, or (IPv6) a quoted packet with extension
 * headers, or matching no connection, goes on unchanged. An error whose quote is cut short
 * inside the quoted IP header or the 8 bytes of ports is malformed and dropped. The new values
 * are computed from the linear data (tc pulls the quote in first) with csum_replace's
 * arithmetic, checked independently by the tests, and stored by the hook's helper.
 */
#define KDP_ICMP_DEST_UNREACH 3
#define KDP_ICMP_SOURCE_QUENCH 4
#define KDP_ICMP_TIME_EXCEEDED 11
#define KDP_ICMP_PARAMETERPROB 12
#define KDP_ICMPV6_DEST_UNREACH 1
#define KDP_ICMPV6_PARAMPROB 4 /* 1..4: unreachable, packet too big, time exceeded, parameter problem */
/* Ethernet + IPv4 with options + ICMP header + quoted IPv4 with options + 18 bytes of TCP. */
#define KDP_ICMP4_PULL_LEN (ETH_HLEN + 60 + 8 + 60 + 18)

static __always_inline bool icmp4_is_error(__u8 type)
{
	return type == KDP_ICMP_DEST_UNREACH || type == KDP_ICMP_SOURCE_QUENCH || type == KDP_ICMP_TIME_EXCEEDED ||
	       type == KDP_ICMP_PARAMETERPROB;
}

/* lb_icmp_candidate says whether f (flow_parse's) may be an ICMP error worth a look. */
static __always_inline bool lb_icmp_candidate(const struct flow *f)
{
	if (f->family == KDP_AF_INET)
		return f->proto == IPPROTO_ICMP;
	return f->family == KDP_AF_INET6 && f->proto == IPPROTO_ICMPV6 && f->l4_off &&
	       !(f->flags & (KDP_FLOW_SHORT | KDP_FLOW_MALFORMED | KDP_FLOW_FRAG)) &&
	       f->icmp_type >= KDP_ICMPV6_DEST_UNREACH && f->icmp_type <= KDP_ICMPV6_PARAMPROB;
}

/* csum_replace16 is csum_replace for a 16-byte address, word by word. */
static __always_inline void csum_replace16(__sum16 *sum, const __be32 *from, const __be32 *to)
{
	int i;

#pragma unroll
	for (i = 0; i < 4; i++)
		csum_replace(sum, from[i], to[i], 4);
}

/* icmp_store writes len bytes at off: the values are all computed first and stored at the
 * end, through the hook's store helper, so the tc program makes no direct packet writes (a
 * program that does gets the verifier's un-clone prologue, and every cloned skb, such as each
 * TCP segment of the host's stack, would pay a header copy on entry). */
static __always_inline int icmp_store(void *ctx, const bool xdp, __u32 off, const void *v, __u32 len)
{
	if (xdp)
		return bpf_xdp_store_bytes(ctx, off, (void *)v, len);
	return bpf_skb_store_bytes(ctx, off, v, len, 0);
}

/* lb_icmp4 translates an IPv4 ICMP error (see above); to says toward the guest. */
static __always_inline int lb_icmp4(void *ctx, const bool xdp, const bool to, struct flow *f)
{
	const struct config *cfg;
	struct ct_key ck = {};
	struct ct_entry ce;
	struct iphdr *ip, *eip;
	void *data, *end;
	__u8 *icmp, *el4;
	__sum16 icmpc, l4c = 0, eipc, oipc;
	__be32 old_a, new_a;
	__be16 old_p, new_p;
	__u32 ioff, eoff;
	bool udp, has_l4c, outer;

	ctx_pull(ctx, KDP_ICMP4_PULL_LEN, xdp);
	data = ctx_data(ctx, xdp);
	end = ctx_data_end(ctx, xdp);
	ip = data + ETH_HLEN;
	if ((void *)(ip + 1) > end)
		return -1;
	if (ip->frag_off & bpf_htons(0x3fff)) /* a fragment: not looked into (errors never are) */
		return -1;
	if (ip->ihl < 5)
		return KDP_DROP_MALFORMED;
	ioff = (ETH_HLEN + ip->ihl * 4) & 0x7f;
	icmp = data + ioff;
	if ((void *)(icmp + 1) > end || !icmp4_is_error(icmp[0]))
		return -1;
	eip = (void *)(icmp + 8);
	if ((void *)(eip + 1) > end)
		return KDP_DROP_MALFORMED;
	if (eip->version != 4 || eip->ihl < 5)
		return KDP_DROP_MALFORMED;
	if (eip->protocol != IPPROTO_TCP && eip->protocol != IPPROTO_UDP)
		return -1;
	if (eip->frag_off & bpf_htons(0x1fff)) /* a later fragment quoted: no ports */
		return -1;
	udp = eip->protocol == IPPROTO_UDP;
	eoff = (ioff + 8 + eip->ihl * 4) & 0xff;
	el4 = data + eoff;
	if ((void *)(el4 + 8) > end)
		return KDP_DROP_MALFORMED;

	/* The quoted packet went the other way: guest -> real server (to the guest) is the
	 * reply entry's key reversed, VIP -> guest (from the guest) the original entry's. */
	ck.saddr = eip->daddr;
	ck.daddr = eip->saddr;
	ck.sport = *(__be16 *)(el4 + 2);
	ck.dport = *(__be16 *)el4;
	ck.proto = eip->protocol;
	ck.dir = to ? 1 : 0;
	cfg = config_get();
	if (!cfg || !ct_lookup(cfg, lb_now(), &ck, to ? 1 : 0, &ce))
		return -1;
	new_a = ce.addr;
	new_p = ce.port;
	old_a = to ? eip->daddr : eip->saddr;
	old_p = to ? ck.sport : ck.dport;
	icmpc = *(__sum16 *)(icmp + 2);
	eipc = eip->check;
	oipc = ip->check;
	outer = (to ? ip->saddr : ip->daddr) == old_a;

	/* The quoted L4 checksum (pseudo header and port), when quoted; UDP's 0 is "none". */
	{
		__sum16 *q = (void *)(el4 + (udp ? 6 : 16));

		has_l4c = (void *)(q + 1) <= end && !(udp && *q == 0);
		if (has_l4c)
			l4c = *q;
	}
	if (has_l4c) {
		__sum16 old_c = l4c;

		csum_replace(&l4c, old_a, new_a, 4);
		csum_replace(&l4c, old_p, new_p, 2);
		if (udp && l4c == 0)
			l4c = 0xffff;
		csum_replace(&icmpc, old_c, l4c, 2);
	}
	csum_replace(&icmpc, old_p, new_p, 2);
	csum_replace(&eipc, old_a, new_a, 4);
	csum_replace(&icmpc, eip->check, eipc, 2);
	csum_replace(&icmpc, old_a, new_a, 4);
	if (outer)
		csum_replace(&oipc, old_a, new_a, 4);

	/* Stores: no packet pointer is used after the first. */
	if (icmp_store(ctx, xdp, ioff + 8 + (to ? 16 : 12), &new_a, 4) ||
	    icmp_store(ctx, xdp, ioff + 8 + 10, &eipc, 2) ||
	    icmp_store(ctx, xdp, eoff + (to ? 2 : 0), &new_p, 2) ||
	    (has_l4c && icmp_store(ctx, xdp, eoff + (udp ? 6 : 16), &l4c, 2)) ||
	    icmp_store(ctx, xdp, ioff + 2, &icmpc, 2))
		return KDP_DROP_LB_REWRITE;
	if (outer) {
		if (icmp_store(ctx, xdp, ETH_HLEN + (to ? 12 : 16), &new_a, 4) ||
		    icmp_store(ctx, xdp, ETH_HLEN + 10, &oipc, 2))
			return KDP_DROP_LB_REWRITE;
		if (to)
			f->saddr.v4 = new_a;
		else
			f->daddr.v4 = new_a;
	}
	return -1;
}

/* lb_icmp6 translates an ICMPv6 error (see above); to says toward the guest. f has the
 * ICMPv6 header's offset (flow_parse walked the outer extension headers). */
static __always_inline int lb_icmp6(void *ctx, const bool xdp, const bool to, struct flow *f)
{
	__u32 zero = 0, ioff = f->l4_off & KDP_IPV6_MAX_L4_OFF;
	struct lb6_scratch *sc = bpf_map_lookup_elem(&kdp_lb6_scratch, &zero);
	const struct config *cfg;
	struct ct6_entry *e;
	struct ipv6hdr *ip, *eip;
	void *data, *end;
	__u8 *icmp, *el4;
	__sum16 icmpc, l4c = 0;
	__be32 *ea, *oa, old_a[4];
	__be16 old_p, new_p;
	__u64 seen; /* not refreshed: an ICMP error is no sign of the connection's life */
	bool udp, has_l4c, outer;

	if (!sc)
		return -1;
	ctx_pull(ctx, ioff + 8 + sizeof(*eip) + 18, xdp);
	data = ctx_data(ctx, xdp);
	end = ctx_data_end(ctx, xdp);
	ip = data + ETH_HLEN;
	icmp = data + ioff;
	eip = (void *)(icmp + 8);
	if ((void *)(ip + 1) > end || (void *)(icmp + 4) > end)
		return -1;
	if ((void *)(eip + 1) > end || eip->version != 6)
		return KDP_DROP_MALFORMED;
	if (eip->nexthdr != IPPROTO_TCP && eip->nexthdr != IPPROTO_UDP)
		return -1; /* extension headers or another protocol quoted: not a connection of ours */
	udp = eip->nexthdr == IPPROTO_UDP;
	el4 = (void *)(eip + 1);
	if ((void *)(el4 + 8) > end)
		return KDP_DROP_MALFORMED;

	__builtin_memset(&sc->ck, 0, sizeof(sc->ck));
	__builtin_memcpy(sc->ck.saddr, eip->daddr, 16);
	__builtin_memcpy(sc->ck.daddr, eip->saddr, 16);
	sc->ck.sport = *(__be16 *)(el4 + 2);
	sc->ck.dport = *(__be16 *)el4;
	sc->ck.proto = eip->nexthdr;
	sc->ck.dir = to ? 1 : 0;
	cfg = config_get();
	e = cfg ? lb_ct6_live(cfg, lb_now(), &sc->ck, &seen) : NULL;
	if (!e)
		return -1; /* no connection, or an expired one the sweeper has not deleted yet */
	__builtin_memcpy(sc->ne.addr, e->addr, 16);
	new_p = e->port;
	ea = to ? eip->daddr : eip->saddr;
	oa = to ? ip->saddr : ip->daddr;
	__builtin_memcpy(old_a, ea, 16);
	old_p = to ? sc->ck.sport : sc->ck.dport;
	icmpc = *(__sum16 *)(icmp + 2);
	outer = oa[0] == old_a[0] && oa[1] == old_a[1] && oa[2] == old_a[2] && oa[3] == old_a[3];
	{
		__sum16 *q = (void *)(el4 + (udp ? 6 : 16));

		has_l4c = (void *)(q + 1) <= end;
		if (has_l4c)
			l4c = *q;
	}
	if (has_l4c) {
		__sum16 old_c = l4c;

		csum_replace16(&l4c, old_a, sc->ne.addr);
		csum_replace(&l4c, old_p, new_p, 2);
		csum_replace(&icmpc, old_c, l4c, 2);
	}
	csum_replace(&icmpc, old_p, new_p, 2);
	csum_replace16(&icmpc, old_a, sc->ne.addr);
	if (outer) /* the outer address is in ICMPv6's pseudo header */
		csum_replace16(&icmpc, old_a, sc->ne.addr);

	if (icmp_store(ctx, xdp, ioff + 8 + (to ? 24 : 8), sc->ne.addr, 16) ||
	    icmp_store(ctx, xdp, ioff + 48 + (to ? 2 : 0), &new_p, 2) ||
	    (has_l4c && icmp_store(ctx, xdp, ioff + 48 + (udp ? 6 : 16), &l4c, 2)) ||
	    icmp_store(ctx, xdp, ioff + 2, &icmpc, 2))
		return KDP_DROP_LB_REWRITE;
	if (outer) {
		if (icmp_store(ctx, xdp, to ? KDP_IP6_SADDR_OFF : KDP_IP6_DADDR_OFF, sc->ne.addr, 16))
			return KDP_DROP_LB_REWRITE;
		__builtin_memcpy(to ? f->saddr.v6 : f->daddr.v6, sc->ne.addr, 16);
	}
	return -1;
}

static __always_inline int lb_icmp(void *ctx, const bool xdp, const bool to, struct flow *f)
{
	if (!f)
		return -1;
	if (f->family == KDP_AF_INET)
		return lb_icmp4(ctx, xdp, to, f);
	return lb_icmp6(ctx, xdp, to, f);
}

/* lb_icmp_verdict bounds what a global function returned (to the verifier, any integer: -1,
 * KDP_DROP_MALFORMED or KDP_DROP_LB_REWRITE) for the counters' array index. */
static __always_inline int lb_icmp_verdict(int r)
{
	return r < 0 ? -1 : r & 7;
}

/* One global BPF function per hook and direction, each holding both families: the verifier
 * checks a global function once, on its own (as xdp_fix_csum), where a static one would be
 * walked again for every state it is called in; errors are rare, verification time is not
 * (every sandbox load and agent restart pays it). */
__attribute__((noinline)) int lb_icmp_in_tc(struct __sk_buff *ctx, struct flow *f)
{
	return lb_icmp(ctx, false, true, f);
}

__attribute__((noinline)) int lb_icmp_out_tc(struct __sk_buff *ctx, struct flow *f)
{
	return lb_icmp(ctx, false, false, f);
}

__attribute__((noinline)) int lb_icmp_in_xdp(struct xdp_md *ctx, struct flow *f)
{
	return lb_icmp(ctx, true, true, f);
}

__attribute__((noinline)) int lb_icmp_out_xdp(struct xdp_md *ctx, struct flow *f)
{
	return lb_icmp(ctx, true, false, f);
}

/* lb_from_guest balances the frame of flow f the guest sends: an existing connection keeps its
 * real server, a new one to a service gets one from the scheduler (or the persistence
 * template), and the frame is DNATed to it, and f with it (the strict egress check that follows
 * judges the real destination). TCP and UDP over IPv4 and IPv6 are balanced; an ICMP error
 * the guest sends about a reply is translated (lb_icmp). Returns -1 to go on, or an enum
 * kdp_drop reason. */
static __always_inline int lb_from_guest(void *ctx, const bool xdp, const struct config *cfg, __u32 len,
					 struct flow *f)
{
	if (KDP_LB_COST_SKIP(KDP_COST_LB))
		return -1;
	if (!lb_active(cfg) || !lb_prefilter(f, false))
		return -1;
	flow_ports(ctx_data(ctx, xdp), ctx_data_end(ctx, xdp), f);
	if (KDP_LB_COST_STOP(KDP_STOP_PORTS))
		return -1;
	if (!(f->flags & KDP_FLOW_PORTS)) {
		if (lb_icmp_candidate(f))
			return lb_icmp_verdict(xdp ? lb_icmp_out_xdp(ctx, f) : lb_icmp_out_tc(ctx, f));
		return -1;
	}
	if (f->family == KDP_AF_INET6)
		return xdp ? lb_from6_xdp(ctx, cfg, len, f) : lb_from6_tc(ctx, cfg, len, f);
	if (f->family != KDP_AF_INET)
		return -1;
	return xdp ? lb_from4_xdp(ctx, cfg, len, f) : lb_from4_tc(ctx, cfg, len, f);
}

/* lb_to_guest reverse-NATs a reply from a real server (the frame of flow f) back to the VIP
 * the guest talked to, and translates an ICMP error about a connection (lb_icmp). */
static __always_inline int lb_to_guest(void *ctx, const bool xdp, const struct config *cfg, __u32 len,
				       struct flow *f)
{
	struct ct_key ck = {};
	struct ct_entry ce;
	struct ct_slot *e;
	__be32 vip;
	__be16 vport;
	__u32 csum_off;
	__u64 now;
	bool udp;

	if (!lb_active(cfg))
		return -1;
	/* An ICMP error may come from a router on the way (no real server's source), so it is
	 * taken before the prefilter; the prefilter comes before the port parse, which most
	 * frames to the guest (from no real server) then skip. */
	if (lb_icmp_candidate(f))
		return lb_icmp_verdict(xdp ? lb_icmp_in_xdp(ctx, f) : lb_icmp_in_tc(ctx, f));
	if (!lb_prefilter(f, true))
		return -1;
	flow_ports(ctx_data(ctx, xdp), ctx_data_end(ctx, xdp), f);
	if (!(f->flags & KDP_FLOW_PORTS))
		return -1;
	if (f->family == KDP_AF_INET6)
		return xdp ? lb_to6_xdp(ctx, cfg, len, f) : lb_to6_tc(ctx, cfg, len, f);
	if (f->family != KDP_AF_INET)
		return -1;
	ck.saddr = f->saddr.v4;
	ck.daddr = f->daddr.v4;
	ck.sport = f->sport;
	ck.dport = f->dport;
	ck.proto = f->proto;
	ck.dir = 1;
	now = lb_now();
	/* An expired entry is no connection (ct_lookup): a late reply to a dead connection goes
	 * on untranslated, as it did when the sweeper deleted the entry. */
	e = ct_lookup(cfg, now, &ck, 1, &ce);
	if (!e)
		return -1;
	ct_touch(f->tcpflags, &e->e.last_seen, ce.last_seen, now, (__u64 *)&e->e.addr, (const __u64 *)&ce.addr,
		 KDP_CT_STATE_SHIFT, 0); /* the reply entry: no count */
	vip = ce.addr;
	vport = ce.port;
	lb_count(KDP_LB_STATS_BACKEND, ce.backend, false, len);
	lb_count(KDP_LB_STATS_SVC, ce.svc, false, len);
	udp = f->proto == IPPROTO_UDP;
	csum_off = f->l4_off + (udp ? 6 : 16);
	if (ctx_rewrite4(ctx, KDP_IP_SADDR_OFF, f->saddr.v4, vip, KDP_IP_CSUM_OFF, csum_off, udp, xdp))
		return KDP_DROP_LB_REWRITE;
	if (vport != f->sport && ctx_rewrite2(ctx, f->l4_off, f->sport, vport, csum_off, udp, xdp))
		return KDP_DROP_LB_REWRITE;
	return -1;
}

#endif
