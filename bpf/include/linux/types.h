/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Minimal replacement for the kernel's <linux/types.h>, so the vendored UAPI headers
 * compile with -nostdinc for the BPF target (no libc, no asm/ headers). Written for
 * kata-dp, not vendored: hack/update-bpf-headers.sh leaves it alone.
 */
#ifndef __KDP_LINUX_TYPES_H
#define __KDP_LINUX_TYPES_H

typedef signed char __s8;
typedef unsigned char __u8;
typedef signed short __s16;
typedef unsigned short __u16;
typedef signed int __s32;
typedef unsigned int __u32;
typedef signed long long __s64;
typedef unsigned long long __u64;

typedef __u16 __le16;
typedef __u16 __be16;
typedef __u32 __le32;
typedef __u32 __be32;
typedef __u64 __le64;
typedef __u64 __be64;
typedef __u16 __sum16;
typedef __u32 __wsum;

typedef __u8 u8;
typedef __u16 u16;
typedef __u32 u32;
typedef __u64 u64;

#define __bitwise
#define __aligned_u64 __u64 __attribute__((aligned(8)))

typedef _Bool bool;
#define true 1
#define false 0
#define NULL ((void *)0)

#endif
