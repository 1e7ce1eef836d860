/* A SUT with no Python and no work: LoadGen's own ceiling on a host (bench/loadgen_ceiling.py).
 *
 * IssueQuery (C, LoadGen's C API) copies the (response id, sample index) pairs it gets into a block and
 * queues it; `workers` C threads complete each block at once through LoadGen's C QuerySamplesComplete, in
 * responses of `chunk` samples pointing at one constant prediction. With 0 workers the issuing thread
 * completes inline. What such a SUT reaches is what LoadGen itself (its issue scheduling, its per-sample
 * completion and logging threads) can carry on this CPU: the bound above any driver, Python or not.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t id;
    uint64_t index;
} QuerySample;

typedef struct { /* loadgen/query_sample.h, 6.x: {id, data, size, n_tokens} */
    uint64_t id;
    uint64_t data;
    uint64_t size;
    int64_t n_tokens;
} Response;

typedef void (*complete_fn)(Response *, size_t);

typedef struct Block {
    struct Block *next;
    size_t n;
    QuerySample samples[];
} Block;

static complete_fn complete = NULL;
static size_t chunk = 1024;
static float prediction = 0.5f;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t has_block = PTHREAD_COND_INITIALIZER;
static Block *first = NULL, *last = NULL;
static int closed = 0;
#define MAX_THREADS 64
static pthread_t workers[MAX_THREADS], issuers[MAX_THREADS];
static int n_workers = 0, n_issuers = 0;
static uint64_t completed = 0, calls = 0;

static void complete_samples(const QuerySample *s, size_t n) {
    Response *buf = (Response *)malloc(chunk * sizeof(Response));
    if (buf == NULL)
        abort(); /* a probe: no partial result */
    for (size_t a = 0; a < n; a += chunk) {
        size_t m = n - a < chunk ? n - a : chunk;
        for (size_t i = 0; i < m; i++) {
            buf[i].id = s[a + i].id;
            buf[i].data = (uint64_t)(uintptr_t)&prediction;
            buf[i].size = sizeof(prediction);
            buf[i].n_tokens = 0;
        }
        complete(buf, m);
    }
    free(buf);
    __atomic_add_fetch(&completed, n, __ATOMIC_RELAXED);
}

static void *worker_main(void *arg) {
    (void)arg;
    for (;;) {
        pthread_mutex_lock(&lock);
        while (first == NULL && !closed)
            pthread_cond_wait(&has_block, &lock);
        Block *b = first;
        if (b == NULL) {
            pthread_mutex_unlock(&lock);
            return NULL;
        }
        first = b->next;
        if (first == NULL)
            last = NULL;
        pthread_mutex_unlock(&lock);
        complete_samples(b->samples, b->n);
        free(b);
    }
}

/* LoadGen's IssueQueryCallback(ClientData, const QuerySample*, size_t). Offline's one query is cut into
 * blocks of `chunk` * 16 samples so that every worker gets some. */
void null_issue(uintptr_t client, const QuerySample *samples, size_t n) {
    (void)client;
    __atomic_add_fetch(&calls, 1, __ATOMIC_RELAXED);
    if (n_workers == 0) {
        complete_samples(samples, n);
        return;
    }
    size_t per = chunk * 16;
    for (size_t a = 0; a < n; a += per) {
        size_t m = n - a < per ? n - a : per;
        Block *b = (Block *)malloc(sizeof(Block) + m * sizeof(QuerySample));
        if (b == NULL)
            abort();
        b->next = NULL;
        b->n = m;
        memcpy(b->samples, samples + a, m * sizeof(QuerySample));
        pthread_mutex_lock(&lock);
        if (last)
            last->next = b;
        else
            first = b;
        last = b;
        pthread_cond_signal(&has_block);
        pthread_mutex_unlock(&lock);
    }
}

void null_flush(void) {}

/* 0 on success: `complete_addr` is LoadGen's C QuerySamplesComplete; `threads` completion workers. */
int null_start(void *complete_addr, size_t chunk_samples, int threads) {
    if (threads < 0 || threads > MAX_THREADS || chunk_samples == 0)
        return -1;
    complete = (complete_fn)complete_addr;
    chunk = chunk_samples;
    closed = 0;
    completed = calls = 0;
    for (int i = 0; i < threads; i++) {
        if (pthread_create(&workers[i], NULL, worker_main, NULL) != 0)
            return -1;
        n_workers = i + 1;
    }
    return 0;
}

static void *issuer_main(void *register_fn) {
    ((void (*)(void))register_fn)(); /* LoadGen's RegisterIssueQueryThread: returns at the test's end */
    return NULL;
}

/* LoadGen's own issue threads (Server, server_num_issue_query_threads): 0 on success. */
int null_start_issuers(int n, void *register_fn) {
    if (n < 0 || n > MAX_THREADS)
        return -1;
    for (int i = 0; i < n; i++) {
        if (pthread_create(&issuers[i], NULL, issuer_main, register_fn) != 0)
            return -1;
        n_issuers = i + 1;
    }
    return 0;
}

/* After the test: the workers finish what is queued and end; the issuers have ended with the test. */
void null_stop(uint64_t *out) {
    pthread_mutex_lock(&lock);
    closed = 1;
    pthread_cond_broadcast(&has_block);
    pthread_mutex_unlock(&lock);
    for (int i = 0; i < n_workers; i++)
        pthread_join(workers[i], NULL);
    for (int i = 0; i < n_issuers; i++)
        pthread_join(issuers[i], NULL);
    n_workers = n_issuers = 0;
    out[0] = completed;
    out[1] = calls;
}
