/* The dense float64 oracle of the C tests: x = (F + λI)⁻¹ v with F = (1/m) Σ u_i u_iᵀ over the
   rows u_i (m × d, row-major), by Gaussian elimination with partial pivoting; with a diagonal
   base e (d numbers, or NULL), x = (F + λ diag(e))⁻¹ v. Independent of BLAS and LAPACK. */
#ifndef TENGRAD_TEST_ORACLE_H
#define TENGRAD_TEST_ORACLE_H
#include <math.h>
#include <stdlib.h>

static void oracle_solve_base(const double *u, int m, int d, double lambda, const double *e, const double *v,
                              double *x) {
    const int w = d + 1;
    double *f = (double *)malloc(sizeof(double) * (size_t)d * (size_t)w);
    if (!f) abort();
    for (int r = 0; r < d; r++) {
        for (int c = 0; c < d; c++) {
            double sum = 0;
            for (int i = 0; i < m; i++) sum += u[i * d + r] * u[i * d + c];
            f[r * w + c] = sum / m + (r == c ? lambda * (e ? e[r] : 1) : 0);
        }
        f[r * w + d] = v[r];
    }
    for (int k = 0; k < d; k++) {
        int p = k;
        for (int r = k + 1; r < d; r++) if (fabs(f[r * w + k]) > fabs(f[p * w + k])) p = r;
        for (int c = 0; c <= d; c++) { double t = f[k * w + c]; f[k * w + c] = f[p * w + c]; f[p * w + c] = t; }
        for (int r = k + 1; r < d; r++) {
            double q = f[r * w + k] / f[k * w + k];
            for (int c = k; c <= d; c++) f[r * w + c] -= q * f[k * w + c];
        }
    }
    for (int r = d - 1; r >= 0; r--) {
        double sum = f[r * w + d];
        for (int c = r + 1; c < d; c++) sum -= f[r * w + c] * x[c];
        x[r] = sum / f[r * w + r];
    }
    free(f);
}

static inline void oracle_solve(const double *u, int m, int d, double lambda, const double *v, double *x) {
    oracle_solve_base(u, m, d, lambda, NULL, v, x);
}
#endif
