//go:build ignore
/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The cold-entry probe (bench/lbperf's BenchmarkColdEntries): what touching k distinct map
 * entries costs a program run by BPF_PROG_TEST_RUN once per fresh frame, the way the load
 * balancer's new-connection frame is timed. The frame names the entries, so the benchmark
 * chooses per frame: the same ones every time (warm), or random ones of a large map (cold), in
 * one page or in distinct pages.
 *
 *   cold_array  reads (or atomically adds to) k entries of cold_array, an array of 64-byte
 *               entries (one cache line each, page-aligned: BPF_F_MMAPABLE, as kdp_lb_ct)
 *   cold_hash   the same with k entries of cold_hash, a hash map without preallocation (as
 *               the load balancer's kdp_lb_svc, kdp_lb_stats, ...), keyed {0, id}
 *   cold_hashes the same with entry i in the i-th of eight such maps: what a lookup in one
 *               more map costs (the datapath's new connection looks into three hash maps)
 *
 * Chained (cold_req.chain), each entry's index depends on what the previous one holds, as the
 * load balancer's service master -> slot -> real server lookups do: the misses cannot overlap.
 * The benchmark keeps n[1] 0, so the indices stay the frame's.
 *
 * Frame: an Ethernet header and two bytes (16, not looked at), then struct cold_req. Both programs
 * return the sum of the first words they read (read mode) or k (add mode, which adds 1 to each
 * entry's first word as the datapath's counters do), and COLD_BAD for a malformed request or
 * an entry that is not there.
 */
#include <linux/bpf.h>
#include <bpf_helpers.h>

char __license[] SEC("license") = "Dual BSD/GPL";

#define COLD_MAX_K 8
#define COLD_BAD 0xffffffff
#define COLD_REQ_OFF 16 /* after the Ethernet header and two bytes: aligned words */

/* One cache line. */
struct cold_line {
	__u64 n[8];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 12288); /* 768 KiB, kdp_lb_ct's size; refprog.LoadCold resizes it */
	__type(key, __u32);
	__type(value, struct cold_line);
	__uint(map_flags, BPF_F_MMAPABLE); /* page-aligned entries: 64 per page */
} cold_array SEC(".maps");

/* lb_stats_key and lb_stats' sizes. */
struct cold_key {
	__u32 kind;
	__u32 id;
};

struct cold_val {
	__u64 n[6];
};

#define COLD_HASH_MAP(name)                                                                        \
	struct {                                                                                   \
		__uint(type, BPF_MAP_TYPE_HASH);                                                   \
		__uint(max_entries, 40960); /* KDP_LB_MAX_STATS */                                 \
		__type(key, struct cold_key);                                                      \
		__type(value, struct cold_val);                                                    \
		__uint(map_flags, BPF_F_NO_PREALLOC);                                              \
	} name SEC(".maps")

/* cold_hash, and seven more of the same for cold_hashes_touch. */
COLD_HASH_MAP(cold_hash);
COLD_HASH_MAP(cold_hash1);
COLD_HASH_MAP(cold_hash2);
COLD_HASH_MAP(cold_hash3);
COLD_HASH_MAP(cold_hash4);
COLD_HASH_MAP(cold_hash5);
COLD_HASH_MAP(cold_hash6);
COLD_HASH_MAP(cold_hash7);

struct cold_req {
	__u8 k;   /* entries to touch, 0..COLD_MAX_K */
	__u8 add;   /* 1: __sync_fetch_and_add(&n[0], 1) instead of reading n[0] */
	__u8 chain; /* 1: each index after the first is idx[i] ^ the previous entry's n[1] */
	__u8 pad;
	__u32 idx[COLD_MAX_K]; /* array index or hash key id, host order */
};

static __always_inline struct cold_req *cold_req(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct cold_req *r = data + COLD_REQ_OFF;

	if ((void *)(r + 1) > end || r->k > COLD_MAX_K)
		return 0;
	return r;
}

SEC("tc")
int cold_array_touch(struct __sk_buff *skb)
{
	struct cold_req *r = cold_req(skb);
	__u32 sum = 0, link = 0;
	int i;

	if (!r)
		return COLD_BAD;
#pragma unroll
	for (i = 0; i < COLD_MAX_K; i++) {
		__u32 idx = r->idx[i] ^ link;
		struct cold_line *v;

		if (i >= r->k)
			break;
		v = bpf_map_lookup_elem(&cold_array, &idx);
		if (!v)
			return COLD_BAD;
		if (r->add) {
			__sync_fetch_and_add(&v->n[0], 1);
			sum++;
		} else {
			sum += v->n[0];
		}
		if (r->chain)
			link = v->n[1];
	}
	return sum;
}

/* cold_hash_touch looks every entry up in cold_hash, cold_hashes_touch entry i in the i-th of
 * the eight hash maps (each call site keeps its one map, so the verifier inlines every lookup as
 * it does the datapath's). */
#define COLD_HASH_TOUCH(name, map_of)                                                              \
	SEC("tc")                                                                                  \
	int name(struct __sk_buff *skb)                                                            \
	{                                                                                          \
		struct cold_req *r = cold_req(skb);                                                \
		__u32 sum = 0, link = 0;                                                           \
		int i;                                                                             \
                                                                                                   \
		if (!r)                                                                            \
			return COLD_BAD;                                                           \
		_Pragma("unroll") for (i = 0; i < COLD_MAX_K; i++)                                 \
		{                                                                                  \
			struct cold_key key = { .id = r->idx[i] ^ link };                          \
			struct cold_val *v;                                                        \
                                                                                                   \
			if (i >= r->k)                                                             \
				break;                                                             \
			v = bpf_map_lookup_elem(map_of(i), &key);                                  \
			if (!v)                                                                    \
				return COLD_BAD;                                                   \
			if (r->add) {                                                              \
				__sync_fetch_and_add(&v->n[0], 1);                                 \
				sum++;                                                             \
			} else {                                                                   \
				sum += v->n[0];                                                    \
			}                                                                          \
			if (r->chain)                                                              \
				link = v->n[1];                                                    \
		}                                                                                  \
		return sum;                                                                        \
	}

#define COLD_ONE_MAP(i) (&cold_hash)
#define COLD_MAP_I(i)                                                                              \
	((i) == 0 ? (void *)&cold_hash :                                                           \
	 (i) == 1 ? (void *)&cold_hash1 :                                                          \
	 (i) == 2 ? (void *)&cold_hash2 :                                                          \
	 (i) == 3 ? (void *)&cold_hash3 :                                                          \
	 (i) == 4 ? (void *)&cold_hash4 :                                                          \
	 (i) == 5 ? (void *)&cold_hash5 :                                                          \
	 (i) == 6 ? (void *)&cold_hash6 :                                                          \
		    (void *)&cold_hash7)

COLD_HASH_TOUCH(cold_hash_touch, COLD_ONE_MAP)
COLD_HASH_TOUCH(cold_hashes_touch, COLD_MAP_I)
