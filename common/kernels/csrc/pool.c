/* See pool.h. One task at a time (run_lock); every started thread takes part in every task
 * (parts beyond `count` do nothing), so no thread can lag a task behind and see the next one's
 * fields half written. */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <stdatomic.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define CPU_RELAX() _mm_pause()
#else
#define CPU_RELAX() ((void)0)
#endif

/* Longer than the widest gap inside one decode step (attention, norms and Python between two
 * products, 100-200 us at 110M): a thread that went to sleep in such a gap woke too late for the
 * next product, so 2 threads were only ~1.15x one in a 110M float32 step. Spinning 1 ms instead of
 * 50 us: float32 step 20.8 -> 17.5 ms, Q4_0 11.0 -> 7.6 ms (medians of 3 interleaved runs each).
 * A busy machine does not pay it: there the thread count drops to one (blas_threads.py) and the
 * pool's threads sleep. */
#define POOL_SPIN_NS 1000000L

static struct {
    pthread_mutex_t lock, run_lock;
    pthread_cond_t wake, done;
    int n_started;            /* threads beside the caller's */
    atomic_ulong generation;  /* bumped once per task, after its fields are written */
    pool_task_t task;
    void *context;
    int count;
    atomic_int pending;       /* started threads that have not finished the current task */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER,
          PTHREAD_COND_INITIALIZER, 0, 0, NULL, NULL, 0, 0};

static long elapsed_ns(const struct timespec *since) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - since->tv_sec) * 1000000000L + (now.tv_nsec - since->tv_nsec);
}

/* Spin until *value differs from `unwanted` or POOL_SPIN_NS pass; whether it changed. */
static int spin_while_ulong(atomic_ulong *value, unsigned long unwanted) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 1;; i++) {
        if (atomic_load_explicit(value, memory_order_acquire) != unwanted) return 1;
        CPU_RELAX();
        if (i % 64 == 0 && elapsed_ns(&start) > POOL_SPIN_NS) return 0;
    }
}

static int spin_while_positive(atomic_int *value) {
    struct timespec start;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 1;; i++) {
        if (atomic_load_explicit(value, memory_order_acquire) <= 0) return 1;
        CPU_RELAX();
        if (i % 64 == 0 && elapsed_ns(&start) > POOL_SPIN_NS) return 0;
    }
}

/* The generation each thread was started at: a thread may first run after the task it was started
 * for was published, so it cannot read its starting point itself. */
static unsigned long started_at[POOL_MAX_THREADS];

static void *pool_thread(void *arg) {
    int index = (int)(long)arg;
    unsigned long seen = started_at[index];
    for (;;) {
        if (!spin_while_ulong(&pool.generation, seen)) {
            pthread_mutex_lock(&pool.lock);
            while (atomic_load(&pool.generation) == seen) pthread_cond_wait(&pool.wake, &pool.lock);
            pthread_mutex_unlock(&pool.lock);
        }
        seen = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (index < pool.count) pool.task(pool.context, index, pool.count);
        if (atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_acq_rel) == 1) {
            pthread_mutex_lock(&pool.lock);
            pthread_cond_signal(&pool.done);
            pthread_mutex_unlock(&pool.lock);
        }
    }
    return NULL;
}

/* Start threads until `wanted` run beside the caller (or none more can start). Under run_lock. */
static void start_threads(int wanted) {
    while (pool.n_started < wanted && pool.n_started + 1 < POOL_MAX_THREADS) {
        pthread_t thread;
        started_at[pool.n_started + 1] = atomic_load(&pool.generation); /* pthread_create publishes it */
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        int failed = pthread_create(&thread, &attributes, pool_thread, (void *)(long)(pool.n_started + 1));
        pthread_attr_destroy(&attributes);
        if (failed) return;
        pool.n_started++;
    }
}

/* A forked child has none of the parent's threads: start afresh. */
static void reset_in_child(void) {
    pthread_mutex_init(&pool.lock, NULL);
    pthread_mutex_init(&pool.run_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pthread_cond_init(&pool.done, NULL);
    pool.n_started = 0;
    atomic_store(&pool.pending, 0);
}

static pthread_once_t registered = PTHREAD_ONCE_INIT;
static void register_fork_handler(void) { pthread_atfork(NULL, NULL, reset_in_child); }

void pool_run(pool_task_t task, void *context, int count) {
    if (count <= 1) {
        task(context, 0, 1);
        return;
    }
    if (count > POOL_MAX_THREADS) count = POOL_MAX_THREADS;
    pthread_once(&registered, register_fork_handler);
    pthread_mutex_lock(&pool.run_lock);
    start_threads(count - 1);
    int helpers = pool.n_started;
    if (helpers == 0) { /* no thread could start: every part here */
        for (int i = 0; i < count; i++) task(context, i, count);
        pthread_mutex_unlock(&pool.run_lock);
        return;
    }
    pthread_mutex_lock(&pool.lock);
    pool.task = task, pool.context = context, pool.count = count;
    atomic_store_explicit(&pool.pending, helpers, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.lock);
    task(context, 0, count);
    for (int i = helpers + 1; i < count; i++) task(context, i, count); /* parts no thread could take */
    if (!spin_while_positive(&pool.pending)) {
        pthread_mutex_lock(&pool.lock);
        while (atomic_load(&pool.pending) > 0) pthread_cond_wait(&pool.done, &pool.lock);
        pthread_mutex_unlock(&pool.lock);
    }
    pthread_mutex_unlock(&pool.run_lock);
}
