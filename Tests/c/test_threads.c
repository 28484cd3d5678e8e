/*
 * Concurrency: distinct handles used from several threads at once give bit-identical results to
 * sequential use; two threads sharing one handle (forbidden by the header) get TENGRAD_OK or
 * TENGRAD_ERROR_STATE, never a crash or a corrupted handle. Prints "N passed, N failed".
 */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "tengrad.h"
#include "check.h"

enum { THREADS = 4, STEPS = 20, M = 16, IN = 64, OUT = 32, CIN = 4, COUT = 8, HW = 10 };



typedef struct {
    unsigned seed;
    float linear_w[OUT * IN], linear_b[OUT];
    float conv_w[COUT * CIN * 9], conv_b[COUT];
    int status;
} job;

static void fill(float *x, int n, unsigned *seed) {
    for (int i = 0; i < n; i++) {
        *seed = *seed * 1103515245u + 12345u;
        x[i] = (float)((int)((*seed >> 8) % 2001) - 1000) / 1000.0f;
    }
}

/* A small training-like sequence on a private handle: curvature and updates every step. */
static void *run_job(void *arg) {
    job *j = (job *)arg;
    static const tengrad_conv2d_shape shape = {sizeof(tengrad_conv2d_shape), CIN, COUT, HW, HW, 3, 3, 1, 1, 1, 1, 1, 1, 2, 1};
    tengrad_preconditioner *p = NULL;
    int32_t fc = -1, conv = -1;
    unsigned seed = j->seed;
    float *a = (float *)malloc(sizeof(float) * M * IN), *g = (float *)malloc(sizeof(float) * M * OUT);
    float *x = (float *)malloc(sizeof(float) * M * CIN * HW * HW), *gy = (float *)malloc(sizeof(float) * M * COUT * HW * HW);
    j->status = tengrad_create(&p);
    if (j->status == TENGRAD_OK) j->status = tengrad_add_linear(p, IN, OUT, 1, &fc);
    if (j->status == TENGRAD_OK) j->status = tengrad_add_conv2d(p, &shape, &conv);
    for (int step = 0; step < STEPS && j->status == TENGRAD_OK; step++) {
        fill(a, M * IN, &seed);
        fill(g, M * OUT, &seed);
        fill(x, M * CIN * HW * HW, &seed);
        fill(gy, M * COUT * HW * HW, &seed);
        j->status = tengrad_natural_gradient(p, fc, M, a, g, M, j->linear_w, j->linear_b);
        if (j->status == TENGRAD_OK) j->status = tengrad_update_curvature(p, conv, M, x, gy, M);
        if (j->status == TENGRAD_OK) j->status = tengrad_precondition(p, conv, j->conv_w, j->conv_b, j->conv_w, j->conv_b);
        if (j->status == TENGRAD_OK && step == 0) fill(j->conv_w, COUT * CIN * 9, &seed);
    }
    tengrad_destroy(p);
    free(a); free(g); free(x); free(gy);
    return NULL;
}

typedef struct {
    tengrad_preconditioner *p;
    int32_t layer;
    int with_nan; /* this thread's batches hold a NaN: its calls fail and set messages */
    int ok, refused, not_finite, busy_text, other;
} shared_job;

static void *hammer(void *arg) {
    shared_job *s = (shared_job *)arg;
    float *a = malloc(sizeof(float) * M * IN), *g = malloc(sizeof(float) * M * OUT);
    float *w = malloc(sizeof(float) * OUT * IN), *b = malloc(sizeof(float) * OUT);
    unsigned seed = 99;
    fill(a, M * IN, &seed);
    fill(g, M * OUT, &seed);
    if (s->with_nan) g[3] = NAN;
    for (int i = 0; i < 200; i++) {
        tengrad_status st = tengrad_natural_gradient(s->p, s->layer, M, a, g, M, w, b);
        if (st == TENGRAD_OK) s->ok++;
        else if (st == TENGRAD_ERROR_NOT_FINITE && s->with_nan) s->not_finite++;
        else if (st == TENGRAD_ERROR_STATE) {
            s->refused++;
            /* The refused call's message: while the other call runs, a static busy text, never
               the other call's message being replaced (ASan checks the read). */
            const char *msg = tengrad_last_error(s->p);
            if (strcmp(msg, "handle busy (concurrent call)") == 0) s->busy_text++;
            else if (strlen(msg) > 1000) s->other++;
        } else s->other++;
    }
    free(a);
    free(g);
    free(w);
    free(b);
    return NULL;
}

int main(void) {
    static job sequential[THREADS], parallel[THREADS];
    for (int t = 0; t < THREADS; t++) {
        memset(&sequential[t], 0, sizeof(job));
        sequential[t].seed = 1000u + (unsigned)t;
        parallel[t] = sequential[t];
        run_job(&sequential[t]);
        CHECK(sequential[t].status == TENGRAD_OK);
    }
    pthread_t threads[THREADS];
    for (int t = 0; t < THREADS; t++) CHECK(pthread_create(&threads[t], NULL, run_job, &parallel[t]) == 0);
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);
    for (int t = 0; t < THREADS; t++) {
        CHECK(parallel[t].status == TENGRAD_OK);
        CHECK(memcmp(parallel[t].linear_w, sequential[t].linear_w, sizeof parallel[t].linear_w) == 0);
        CHECK(memcmp(parallel[t].linear_b, sequential[t].linear_b, sizeof parallel[t].linear_b) == 0);
        CHECK(memcmp(parallel[t].conv_w, sequential[t].conv_w, sizeof parallel[t].conv_w) == 0);
        CHECK(memcmp(parallel[t].conv_b, sequential[t].conv_b, sizeof parallel[t].conv_b) == 0);
    }

    /* Misuse: two threads on one handle. Every call either runs or is refused. */
    shared_job s[2];
    memset(s, 0, sizeof s);
    tengrad_preconditioner *p = NULL;
    int32_t layer = -1;
    CHECK(tengrad_create(&p) == TENGRAD_OK);
    CHECK(tengrad_add_linear(p, IN, OUT, 1, &layer) == TENGRAD_OK);
    for (int t = 0; t < 2; t++) {
        s[t].p = p;
        s[t].layer = layer;
        s[t].with_nan = t;
        CHECK(pthread_create(&threads[t], NULL, hammer, &s[t]) == 0);
    }
    for (int t = 0; t < 2; t++) pthread_join(threads[t], NULL);
    CHECK(s[0].other == 0 && s[1].other == 0);
    /* Every call ran or was refused (which ones overlap is up to the scheduler). */
    CHECK(s[0].ok + s[0].refused == 200 && s[1].not_finite + s[1].refused == 200 && s[1].ok == 0);
    printf("shared handle: %d calls ran (%d of them rejected NaN input), %d overlapping calls refused, "
           "%d of those read the busy text\n", s[0].ok + s[1].not_finite, s[1].not_finite,
           s[0].refused + s[1].refused, s[0].busy_text + s[1].busy_text);
    static float w[OUT * IN], b[OUT], a1[M * IN], g1[M * OUT];
    unsigned seed1 = 7;
    fill(a1, M * IN, &seed1);
    fill(g1, M * OUT, &seed1);
    CHECK(tengrad_natural_gradient(p, layer, M, a1, g1, M, w, b) == TENGRAD_OK); /* the handle still works */
    CHECK(tengrad_precondition(p, layer, w, b, w, b) == TENGRAD_OK);
    tengrad_layer_stats stats;
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    CHECK(tengrad_get_layer_stats(p, layer, &stats) == TENGRAD_OK && stats.batch == M);
    tengrad_destroy(p);
    return report();
}
