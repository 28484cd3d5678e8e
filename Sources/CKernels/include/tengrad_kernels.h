/* Kernels of our own for the linear precondition (docs/DESIGN.md §10): the two products of
   (1/λ)(v − U x) over a small batch, with the gradient's validation folded into the first and
   the (1/λ) v term into the second's epilogue, so the gradient is read twice instead of four
   times. AVX2 + FMA: callers check the CPU first (the core's `FusedLinear.available`), also for
   tengrad_k_pack_positions on x86-64; the other packing helpers are plain C. Row tiles are taken
   from a shared counter, so two threads can run one job and each tile's numbers do not depend
   on which thread computed it. */
#ifndef TENGRAD_KERNELS_H
#define TENGRAD_KERNELS_H
#include <stdint.h>

/* Internal to libtengrad.so: none of these is exported (tengrad.h is the whole ABI). */
#define TENGRAD_K_INTERNAL __attribute__((visibility("hidden")))

/* Rows per tile of the two jobs below. */
#define TENGRAD_K_TILE_ROWS 48

/* Aᵀ packed for the first product: panels of 16 positions, [panel][i][16], zero past n.
   a: n rows of `in` floats, row stride lda. ap: ceil(n/16)·16·in floats. */
TENGRAD_K_INTERNAL void tengrad_k_pack_positions(int64_t n, int64_t in, const float *a, int64_t lda, float *ap);

/* A packed for the second product: panels of 16 features, [panel][q][16], panel k holding
   features 16k − shift .. 16k − shift + 15 (0 ≤ shift < 16), zero outside [0, in). The shift
   lets the output's rows be written in whole 64-byte lines when the output starts off a line
   (numpy's arrays start 16 bytes past one: 1024², 32 positions, one thread, out of place 1.10
   ms against 0.95 on a line). ap: ceil((in + shift)/16)·16·n floats. */
TENGRAD_K_INTERNAL void tengrad_k_pack_features(int64_t n, int64_t in, int64_t shift, const float *a, int64_t lda,
                                                float *ap);

/* Gradient rows scaled per position, for the second product: [tile of 6 rows][q][6],
   gp = w[q]·g[q·ldg + o], zero past `out`. gp: ceil(out/6)·6·n floats. */
TENGRAD_K_INTERNAL void tengrad_k_pack_gradients(int64_t n, int64_t out, const float *g, int64_t ldg, const float *w, float *gp);

/* T[o][q] = Σ_i V[o][i] A[q][i] (T: out × n, row stride n) and, per row tile, the float64 sum of
   the squares of V's rows (exact squares: finite exactly when every entry is). */
typedef struct {
    int64_t out, in, n;
    const float *v;   /* out × in, row stride in */
    const float *ap;  /* tengrad_k_pack_positions */
    float *t;
    double *tile_sums; /* ceil(out / TENGRAD_K_TILE_ROWS) */
    int64_t next;      /* the next tile: 0 before the first worker starts; the last field (each
                          thread copies the ones before it, off the counter's cache line) */
} tengrad_k_project_job;

/* W[o][i] = β V[o][i] + Σ_q gp[o][q] A[q][i]; W may be V (in place). */
typedef struct {
    int64_t out, in, n;
    const float *gp;  /* tengrad_k_pack_gradients */
    const float *ap;  /* tengrad_k_pack_features */
    const float *v;   /* out × in, row stride in */
    float beta;
    float *w;         /* out × in, row stride in */
    int64_t shift;    /* the shift tengrad_k_pack_features packed with */
    int64_t next;     /* as in tengrad_k_project_job: the last field */
} tengrad_k_apply_job;

/* Run tiles of a job until none is left; any number of threads may call these on one job. */
TENGRAD_K_INTERNAL void tengrad_k_project_work(tengrad_k_project_job *job);
TENGRAD_K_INTERNAL void tengrad_k_apply_work(tengrad_k_apply_job *job);

#endif
