/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
#ifndef __KDP_CONFIG_H
#define __KDP_CONFIG_H

#include <bpf_helpers.h>
#include "common.h"

/* kdp_config: the sandbox-wide settings, read once per frame. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} kdp_config SEC(".maps");

static __always_inline struct config *config_get(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&kdp_config, &zero);
}

#endif
