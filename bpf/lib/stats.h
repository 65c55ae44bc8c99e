/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU counters per endpoint slot and direction: no atomics on the fast path; the control
 * plane sums the CPUs when it reads them. */
#ifndef __KDP_STATS_H
#define __KDP_STATS_H

#include <bpf_helpers.h>
#include "common.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KDP_MAX_ENDPOINTS * KDP_DIR_MAX);
	__type(key, __u32);
	__type(value, struct ep_stats);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, KDP_MAX_ENDPOINTS * KDP_DIR_MAX);
	__type(key, __u32);
	__type(value, struct ep_drops_ext);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_drops_ext SEC(".maps");

static __always_inline struct ep_stats *stats_of(__u32 slot, __u32 dir)
{
	__u32 idx = slot * KDP_DIR_MAX + dir;

	return bpf_map_lookup_elem(&kdp_stats, &idx);
}

static __always_inline void count_fwd(__u32 slot, __u32 dir, __u32 len)
{
	struct ep_stats *s = stats_of(slot, dir);

	if (s) {
		s->packets++;
		s->bytes += len;
	}
}

/* count_drop is the one place every drop is counted. */
static __always_inline void count_drop(__u32 slot, __u32 dir, __u32 reason)
{
	__u32 idx = slot * KDP_DIR_MAX + dir;

	if (reason < KDP_DROP_BASE) {
		struct ep_stats *s = stats_of(slot, dir);

		if (s)
			s->drops[reason]++;
	} else if (reason < KDP_DROP_MAX) {
		struct ep_drops_ext *e = bpf_map_lookup_elem(&kdp_drops_ext, &idx);

		if (e)
			e->drops[reason - KDP_DROP_BASE]++;
	}
}

#endif
