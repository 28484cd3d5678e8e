/* The one seam to BLAS/LAPACK, scipy-openblas32 build (PyPI: a current OpenBLAS with every
   kernel set and runtime dispatch, LAPACK and LAPACKE inside, every symbol prefixed scipy_).
   Its include directory must come first on the search path (-Xcc -I<scipy_openblas32>/include;
   `make build` passes it). The static inline functions below give the prefixed symbols the
   standard names Linalg/BLAS.swift calls, so the Swift seam is the same for both builds. */
#ifndef TENGRAD_CSCIPYOPENBLAS_SHIM_H
#define TENGRAD_CSCIPYOPENBLAS_SHIM_H
#include <stddef.h>

/* LAPACK's Fortran symbols carry the prefix too: declare them under their real names. */
#define LAPACK_GLOBAL(lcname, UCNAME) scipy_##lcname##_
#include "cblas.h"
#include "lapacke.h"

#if !defined(OPENBLAS_VERSION) || !defined(CBLAS_H)
#error "CScipyOpenBLAS needs scipy-openblas32's include directory first on the search path"
#endif

#define TENGRAD_BLAS_BUILD "scipy-openblas32"

static inline void openblas_set_num_threads(int n) { scipy_openblas_set_num_threads(n); }
static inline int openblas_get_num_threads(void) { return scipy_openblas_get_num_threads(); }
static inline char *openblas_get_config(void) { return scipy_openblas_get_config(); }
static inline char *openblas_get_corename(void) { return scipy_openblas_get_corename(); }

static inline void cblas_sgemm(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE ta, enum CBLAS_TRANSPOSE tb,
                               blasint m, blasint n, blasint k, float alpha, const float *a, blasint lda,
                               const float *b, blasint ldb, float beta, float *c, blasint ldc) {
    scipy_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
static inline void cblas_sgemm_batch_strided(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE ta,
                                             enum CBLAS_TRANSPOSE tb, blasint m, blasint n, blasint k, float alpha,
                                             const float *a, blasint lda, blasint stridea, const float *b,
                                             blasint ldb, blasint strideb, float beta, float *c, blasint ldc,
                                             blasint stridec, blasint count) {
    scipy_cblas_sgemm_batch_strided(order, ta, tb, m, n, k, alpha, a, lda, stridea, b, ldb, strideb, beta, c, ldc,
                                    stridec, count);
}
static inline void cblas_ssyrk(enum CBLAS_ORDER order, enum CBLAS_UPLO uplo, enum CBLAS_TRANSPOSE t,
                               blasint n, blasint k, float alpha, const float *a, blasint lda, float beta,
                               float *c, blasint ldc) {
    scipy_cblas_ssyrk(order, uplo, t, n, k, alpha, a, lda, beta, c, ldc);
}
static inline void cblas_sscal(blasint n, float alpha, float *x, blasint incx) { scipy_cblas_sscal(n, alpha, x, incx); }
static inline void cblas_sgemv(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE t, blasint m, blasint n,
                               float alpha, const float *a, blasint lda, const float *x, blasint incx,
                               float beta, float *y, blasint incy) {
    scipy_cblas_sgemv(order, t, m, n, alpha, a, lda, x, incx, beta, y, incy);
}
static inline void cblas_somatcopy(enum CBLAS_ORDER order, enum CBLAS_TRANSPOSE t, blasint rows, blasint cols,
                                   float alpha, const float *a, blasint lda, float *b, blasint ldb) {
    scipy_cblas_somatcopy(order, t, rows, cols, alpha, a, lda, b, ldb);
}
static inline void cblas_dtrsv(enum CBLAS_ORDER order, enum CBLAS_UPLO uplo, enum CBLAS_TRANSPOSE t,
                               enum CBLAS_DIAG diag, blasint n, const double *a, blasint lda, double *x,
                               blasint incx) {
    scipy_cblas_dtrsv(order, uplo, t, diag, n, a, lda, x, incx);
}
static inline void dpotrf_(const char *uplo, const lapack_int *n, double *a, const lapack_int *lda,
                           lapack_int *info, size_t uplo_len) {
    scipy_dpotrf_(uplo, n, a, lda, info, uplo_len);
}
static inline void dpotrs_(const char *uplo, const lapack_int *n, const lapack_int *nrhs, const double *a,
                           const lapack_int *lda, double *b, const lapack_int *ldb, lapack_int *info,
                           size_t uplo_len) {
    scipy_dpotrs_(uplo, n, nrhs, a, lda, b, ldb, info, uplo_len);
}
static inline lapack_int LAPACKE_dpocon(int layout, char uplo, lapack_int n, const double *a, lapack_int lda,
                                        double anorm, double *rcond) {
    return scipy_LAPACKE_dpocon(layout, uplo, n, a, lda, anorm, rcond);
}
#endif
