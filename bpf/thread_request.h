/* SPDX-License-Identifier: GPL-2.0 */
/* The HTTP request each thread is serving: written by the L7 capture
 * (http.bpf.c) from a server request's first byte read to its response's
 * last byte written, read by the CPU profiler's perf_event program
 * (cpu_profile.bpf.c), so that a sample carries the request it ran for.
 *
 * One map, declared here for both objects. User space creates it with
 * whichever object loads first and hands its fd to the other
 * (bpf_map__reuse_fd); either probe alone still loads, with a map of its
 * own that nobody else writes.
 *
 * Slots are indexed by tid & (THREAD_REQ_SLOTS - 1), not a hash keyed by
 * tid: every request start and end writes one, and an array lookup is
 * inlined, with nothing inserted or freed. A slot names its owner (tid), so
 * a thread whose tid shares another's slot never reads that one's request;
 * the later of the two takes the slot (counted by the writer).
 *
 * The owner is written last and cleared first: a sample that interrupts a
 * write on the same CPU sees either no request or a whole one.
 */
#ifndef OTB_THREAD_REQUEST_H
#define OTB_THREAD_REQUEST_H

#define THREAD_REQ_SLOTS 16384

struct thread_request {
	__u32 tid;		/* the thread serving the request; 0: none */
	__u8 method;		/* enum http_method of l7/http1.h */
	__u8 pad[3];
	__u64 route;		/* the path's hash: the key of the http probe's path table */
	__u64 sk;		/* the request's connection (struct sock *) */
	__u64 start_ns;		/* its first byte: with sk, which request holds the slot */
	__u8 trace_id[16];	/* all zero: the request has no span */
	__u64 span_id;		/* the SERVER span's id, 0 when it has none */
	__u64 samples;		/* CPU samples taken in it (the profiler adds) */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, THREAD_REQ_SLOTS);
	__type(key, __u32);
	__type(value, struct thread_request);
} otb_thread_requests SEC(".maps");

static __always_inline struct thread_request *thread_request_slot(__u32 tid)
{
	__u32 slot = tid & (THREAD_REQ_SLOTS - 1);

	return bpf_map_lookup_elem(&otb_thread_requests, &slot);
}

/* Keep the compiler from moving the owner's store across the others. */
#define THREAD_REQ_ORDER() asm volatile("" ::: "memory")

#endif
