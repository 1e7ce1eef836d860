/* LoadGen's IssueQuery without Python: the samples go into a ring that a Python thread drains in batches.
 *
 * LoadGen calls IssueQuery on its issue thread for every (coalesced) Server query. Through the Python
 * binding or a ctypes callback that call takes the GIL and builds arrays each time: about 1.3 M samples/s
 * in Server on the 16-core GPU host, whatever the engines (BENCHMARKS.md, issue 15). Here the callback is
 * C: it copies the (response id, sample index) pairs into a ring under a mutex and returns. A Python
 * thread calls ring_take (ctypes releases the GIL for the call), which waits for samples and hands over
 * everything queued, at most `max`, as two arrays: the driver sends them as one request or a few.
 *
 * Built at first use with the system C compiler (loadgen_driver/issue_ring.py); one ring per process.
 */
#define _GNU_SOURCE /* pthread_timedjoin_np */
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    uint64_t id;    /* mlperf::ResponseId (uintptr_t) */
    uint64_t index; /* mlperf::QuerySampleIndex (size_t) */
} QuerySample;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t has_samples = PTHREAD_COND_INITIALIZER;
static pthread_cond_t has_room = PTHREAD_COND_INITIALIZER;
static QuerySample *ring = NULL;
static size_t capacity = 0, head = 0, count = 0; /* samples at head .. head + count (mod capacity) */
static int closed = 0;
static uint64_t issued = 0, calls = 0;

/* CLOCK_REALTIME `timeout_ms` from now (the clock pthread_cond_timedwait and pthread_timedjoin_np use). */
static struct timespec deadline_in(int timeout_ms) {
    struct timespec until;
    clock_gettime(CLOCK_REALTIME, &until);
    until.tv_sec += timeout_ms / 1000;
    until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until.tv_nsec >= 1000000000L) {
        until.tv_sec += 1;
        until.tv_nsec -= 1000000000L;
    }
    return until;
}

/* 0 on success; a fresh, open, empty ring of `cap` samples. */
int ring_open(size_t cap) {
    pthread_mutex_lock(&lock);
    free(ring);
    ring = (QuerySample *)malloc(cap * sizeof(QuerySample));
    capacity = ring ? cap : 0;
    head = count = 0;
    closed = 0;
    issued = calls = 0;
    pthread_mutex_unlock(&lock);
    return ring ? 0 : -1;
}

/* LoadGen's IssueQueryCallback(ClientData, const QuerySample*, size_t): waits for room while the ring
 * is full (back-pressure on LoadGen's issue thread, as a slow SUT gives), never drops a sample. */
void ring_issue(uintptr_t client, const QuerySample *samples, size_t n) {
    (void)client;
    pthread_mutex_lock(&lock);
    calls++;
    while (n > 0 && !closed) {
        while (count == capacity && !closed)
            pthread_cond_wait(&has_room, &lock);
        if (closed)
            break;
        size_t tail = (head + count) % capacity;
        size_t room = capacity - count;
        size_t run = capacity - tail; /* contiguous slots from tail */
        size_t k = n < room ? n : room;
        if (k > run)
            k = run;
        memcpy(ring + tail, samples, k * sizeof(QuerySample));
        count += k;
        issued += k;
        samples += k;
        n -= k;
        pthread_cond_signal(&has_samples);
    }
    pthread_mutex_unlock(&lock);
}

/* LoadGen's FlushQueriesCallback: nothing is held back here. */
void ring_flush(void) {}

/* Up to `max` queued samples into ids/indices; waits up to timeout_ms for the first. Returns the number
 * taken, 0 on timeout, -1 once the ring is closed and empty. */
long ring_take(uint64_t *ids, int64_t *indices, size_t max, int timeout_ms) {
    struct timespec until = deadline_in(timeout_ms);
    pthread_mutex_lock(&lock);
    while (count == 0 && !closed) {
        if (pthread_cond_timedwait(&has_samples, &lock, &until) == ETIMEDOUT)
            break;
    }
    if (count == 0) {
        int done = closed;
        pthread_mutex_unlock(&lock);
        return done ? -1 : 0;
    }
    size_t k = count < max ? count : max;
    for (size_t i = 0; i < k; i++) {
        const QuerySample *s = ring + (head + i) % capacity;
        ids[i] = s->id;
        indices[i] = (int64_t)s->index;
    }
    head = (head + k) % capacity;
    count -= k;
    pthread_cond_broadcast(&has_room);
    pthread_mutex_unlock(&lock);
    return (long)k;
}

/* No more samples will be taken: ring_issue returns at once, ring_take returns what is left, then -1. */
void ring_close(void) {
    pthread_mutex_lock(&lock);
    closed = 1;
    pthread_cond_broadcast(&has_samples);
    pthread_cond_broadcast(&has_room);
    pthread_mutex_unlock(&lock);
}

/* (samples issued, IssueQuery calls) since ring_open. */
void ring_counts(uint64_t *out) {
    pthread_mutex_lock(&lock);
    out[0] = issued;
    out[1] = calls;
    pthread_mutex_unlock(&lock);
}

/* LoadGen's own issue threads (TestSettings.server_num_issue_query_threads): `n` threads that each call
 * LoadGen's RegisterIssueQueryThread (`register_fn`), which returns when the test ends. LoadGen then
 * issues every n-th Server query on each of them, so its per-query work (scheduling, coalescing) runs
 * on n cores; their IssueQuery calls land in this ring like the main thread's. */
#define MAX_ISSUE_THREADS 64
static pthread_t issue_threads[MAX_ISSUE_THREADS];
static int n_issue_threads = 0;

static void *issue_thread_main(void *register_fn) {
    ((void (*)(void))register_fn)();
    return NULL;
}

/* 0 on success; the number of threads started is `n` (or none, on failure). */
int ring_start_issue_threads(int n, void *register_fn) {
    if (n < 0 || n > MAX_ISSUE_THREADS || n_issue_threads)
        return -1;
    for (int i = 0; i < n; i++) {
        if (pthread_create(&issue_threads[i], NULL, issue_thread_main, register_fn) != 0) {
            n_issue_threads = i; /* those started return when LoadGen ends its test */
            return -1;
        }
    }
    n_issue_threads = n;
    return 0;
}

/* After the test: wait for the issue threads (LoadGen has told them to end). Returns how many did not end
 * within `timeout_ms` each (left running; they hold no lock of ours). */
int ring_join_issue_threads(int timeout_ms) {
    int left = 0;
    for (int i = 0; i < n_issue_threads; i++) {
        struct timespec until = deadline_in(timeout_ms);
        if (pthread_timedjoin_np(issue_threads[i], NULL, &until) != 0) {
            pthread_detach(issue_threads[i]);
            left++;
        }
    }
    n_issue_threads = 0;
    return left;
}
