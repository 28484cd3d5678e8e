/* The library's helper thread (tengrad_helper.h; docs/DESIGN.md §8). One per process, started on
   first use and parked on a condition variable between jobs: waking it cost 9–17 µs on a 2-vCPU
   EPYC VM where starting and joining a thread cost 40–56 µs, a tenth of a 1024² precondition. */
#define _GNU_SOURCE
#include "tengrad_helper.h"
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <time.h>

#if defined(__x86_64__) || defined(__i386__)
#define RELAX() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define RELAX() __asm__ volatile("yield")
#else
#define RELAX() ((void)0)
#endif

#if defined(__linux__)
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
static pthread_once_t fork_handler = PTHREAD_ONCE_INIT;
static pthread_t helper;
static int claimed;              /* a caller holds the helper (atomic) */
static int started;              /* the helper exists in this process (claimer only) */
static int pinned_away_from = -1; /* the caller's CPU the helper's affinity excludes (claimer only) */
static void (*job)(void *);      /* under lock */
static void *job_context;
static int pending, done;        /* under lock; `done` also read atomically while spinning */

/* The CPUs this thread may run on, except the one it runs on now; 0 when there is no other. */
static int other_cpus(cpu_set_t *set, int *here) {
    *here = sched_getcpu();
    if (*here < 0 || *here >= CPU_SETSIZE) return 0;
    if (sched_getaffinity(0, sizeof *set, set) != 0) return 0;
    CPU_CLR(*here, set);
    return CPU_COUNT(set) > 0;
}

int tengrad_k_other_cpus(void *attr) {
    cpu_set_t set;
    int here;
    if (!other_cpus(&set, &here)) return 1;
    return pthread_attr_setaffinity_np((pthread_attr_t *)attr, sizeof set, &set);
}

static void *helper_main(void *unused) {
    (void)unused;
    sigset_t all;  /* signals go to the application's threads, never to ours */
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, 0);
    pthread_mutex_lock(&lock);
    for (;;) {
        while (!pending) pthread_cond_wait(&wake, &lock);
        pending = 0;
        void (*run)(void *) = job;
        void *context = job_context;
        pthread_mutex_unlock(&lock);
        run(context);
        pthread_mutex_lock(&lock);
        __atomic_store_n(&done, 1, __ATOMIC_RELEASE);
        pthread_cond_signal(&finished);
    }
    return 0;
}

/* A forked child has no helper (only the forking thread survives): start afresh. */
static void after_fork_in_child(void) {
    pthread_mutex_init(&lock, 0);
    pthread_cond_init(&wake, 0);
    pthread_cond_init(&finished, 0);
    started = 0;
    pending = 0;
    done = 0;
    pinned_away_from = -1;
    __atomic_store_n(&claimed, 0, __ATOMIC_RELEASE);
}

static void install_fork_handler(void) { pthread_atfork(0, 0, after_fork_in_child); }

int tengrad_k_helper_start(void (*run)(void *), void *context) {
    int expected = 0;
    if (!__atomic_compare_exchange_n(&claimed, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) return 1;
    cpu_set_t set;
    int here;
    if (!other_cpus(&set, &here)) goto refuse;  /* one CPU: a second thread would share it */
    if (!started) {
        pthread_once(&fork_handler, install_fork_handler);
        pthread_attr_t attr;
        if (pthread_attr_init(&attr) != 0) goto refuse;
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setaffinity_np(&attr, sizeof set, &set);
        int failed = pthread_create(&helper, &attr, helper_main, 0);
        pthread_attr_destroy(&attr);
        if (failed) goto refuse;
        started = 1;
        pinned_away_from = here;
    } else if (here != pinned_away_from) {
        /* Away from the caller's CPU: left to itself the scheduler wakes it beside the caller
           when a spinning BLAS worker makes the other core look busy. */
        if (pthread_setaffinity_np(helper, sizeof set, &set) == 0) pinned_away_from = here;
    }
    pthread_mutex_lock(&lock);
    job = run;
    job_context = context;
    done = 0;
    pending = 1;
    pthread_cond_signal(&wake);
    pthread_mutex_unlock(&lock);
    return 0;
refuse:
    __atomic_store_n(&claimed, 0, __ATOMIC_RELEASE);
    return 1;
}

void tengrad_k_helper_join(void) {
    /* The caller's share usually ends within microseconds of the helper's (the jobs take tiles
       from a shared counter): spin a little before sleeping, which would cost another wake. */
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (int i = 1; !__atomic_load_n(&done, __ATOMIC_ACQUIRE); i++) {
        RELAX();
        if (i % 64) continue;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) > 50000) break;
    }
    pthread_mutex_lock(&lock);
    while (!done) pthread_cond_wait(&finished, &lock);
    pthread_mutex_unlock(&lock);
    __atomic_store_n(&claimed, 0, __ATOMIC_RELEASE);
}

#else
/* Not Linux: no helper, and threads started per job are left where the scheduler puts them. */
int tengrad_k_other_cpus(void *attr) {
    (void)attr;
    return 1;
}

int tengrad_k_helper_start(void (*run)(void *), void *context) {
    (void)run;
    (void)context;
    return 1;
}

void tengrad_k_helper_join(void) {}
#endif
