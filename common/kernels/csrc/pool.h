/* A persistent pool of product threads: started once, reused by every product.
 *
 * Creating and joining threads per product cost more than a small product itself (a decode
 * step makes ~80 of them). Idle threads spin for POOL_SPIN_NS (1 ms) after their last task, so back
 * to back products in one step find them awake, then sleep on a condition variable (a
 * passive wait: a busy machine gets the core back within microseconds). */
#ifndef LLMTP_POOL_H
#define LLMTP_POOL_H

/* One part of a task: part `index` of `count` (0 <= index < count). */
typedef void (*pool_task_t)(void *context, int index, int count);

/* Run task(context, i, count) for every i in 0..count-1, part 0 on the calling thread, the others
 * on pool threads (started on first use, at most POOL_MAX_THREADS in all). Returns when every
 * part has finished. Parts a thread cannot be started for run on the calling thread. Callers from
 * several threads take turns. */
void pool_run(pool_task_t task, void *context, int count);

enum { POOL_MAX_THREADS = 64 };

#endif
