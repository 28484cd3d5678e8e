/* AVX2 + FMA versions of the core's passes outside BLAS (the core's `Reduce`; docs/DESIGN.md §10):
   the gradient's validation, the (1/λ) v pass, the diagonal of G·T that gives Uᵀv, the
   gradients scaled per sample for U x and the Gram's mirror. The core
   is built for baseline x86-64, where these ran on 128-bit SSE2; callers check the CPU first
   (`Reduce.wide`). */
#ifndef TENGRAD_PASSES_H
#define TENGRAD_PASSES_H
#include <stdint.h>

/* Internal to libtengrad.so: none of these is exported (tengrad.h is the whole ABI). */
#define TENGRAD_P_INTERNAL __attribute__((visibility("hidden")))

/* Σ x[i]² in float64, each square exact: finite exactly when every x[i] is finite. */
TENGRAD_P_INTERNAL double tengrad_k_sum_squares(const float *x, int64_t n);

/* y[i] = beta · x[i]; y may be x. With stream (y not x), y's lines are written around the cache:
   for arrays far larger than it, which the next pass reads from memory anyway. */
TENGRAD_P_INTERNAL void tengrad_k_scale(const float *x, float beta, float *y, int64_t n, int stream);

/* out[q] += Σ_o t[o·n + q] · g[q·ld + o] for q < n, o < cols: the diagonal of G·T with T
   channel-major (n per row) and G position-major (row stride ld). */
TENGRAD_P_INTERNAL void tengrad_k_diagonal_product(const float *t, int64_t n, const float *g, int64_t ld, int64_t cols,
                                                   float *out);

/* out[q·cols + c] = w_q · g[q·ldg + c] for q < rows, c < cols, where w_q = (float)(alpha_s ·
   x[q / positions]): the gradients scaled per sample; with sums (non-null), also sums[c] =
   Σ_q out[q·cols + c], summed in order of q. */
TENGRAD_P_INTERNAL void tengrad_k_scaled_rows(int64_t rows, int64_t cols, const float *g, int64_t ldg, const double *x,
                                              double alpha_s, int64_t positions, float *out, float *sums);

/* k[j·m + i] = k[i·m + j] for i0 ≤ i < i1, j0 ≤ j < j1 (only j < i when below): one side of a
   symmetric m × m matrix copied onto the other. The two regions must not overlap. */
TENGRAD_P_INTERNAL void tengrad_k_mirror(double *k, int64_t m, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int below);

#endif
