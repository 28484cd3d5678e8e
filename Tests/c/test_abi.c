/*
 * Tests of the C ABI as a C (and C++) caller sees it: every status, NULL handling, messages,
 * atomicity of rejected calls, aliasing, and one dense-oracle check of both entry points.
 * Compiled with -std=c11 -Wall -Wextra -Werror and as C++17. Prints "N passed, N failed".
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "tengrad.h"

static int passed = 0, failed = 0;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (cond) {                                                                      \
            passed++;                                                                    \
        } else {                                                                         \
            failed++;                                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);     \
        }                                                                                \
    } while (0)

#define CHECK_STATUS(call, expected)                                                     \
    do {                                                                                 \
        tengrad_status s_ = (call);                                                      \
        if (s_ == (expected)) {                                                          \
            passed++;                                                                    \
        } else {                                                                         \
            failed++;                                                                    \
            fprintf(stderr, "%s:%d: %s returned %d (%s), expected %d\n", __FILE__, __LINE__, \
                    #call, (int)s_, tengrad_status_string(s_), (int)(expected));         \
        }                                                                                \
    } while (0)

enum { M = 5, IN = 4, OUT = 3, D = OUT * (IN + 1) };

static float act[M * IN], grads[M * OUT], vw[OUT * IN], vb[OUT];

static void fill(float *x, int n, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        x[i] = (float)((int)((seed >> 8) % 2001) - 1000) / 500.0f;
    }
}

/* Dense oracle: (F + λI)^-1 v with F = (1/m) Σ u_i u_iᵀ, u_i = s g_i ⊗ [a_i; 1], by Gaussian
   elimination with partial pivoting in double. v and the result are [W | b] row by row. */
static void oracle(double lambda, double s, const double *v, double *x) {
    static double f[D][D + 1];
    double u[M][D];
    for (int i = 0; i < M; i++)
        for (int r = 0; r < OUT; r++)
            for (int c = 0; c <= IN; c++)
                u[i][r * (IN + 1) + c] = s * grads[i * OUT + r] * (c < IN ? act[i * IN + c] : 1.0);
    for (int r = 0; r < D; r++) {
        for (int c = 0; c < D; c++) {
            double sum = 0;
            for (int i = 0; i < M; i++) sum += u[i][r] * u[i][c];
            f[r][c] = sum / M + (r == c ? lambda : 0);
        }
        f[r][D] = v[r];
    }
    for (int k = 0; k < D; k++) {
        int p = k;
        for (int r = k + 1; r < D; r++) if (fabs(f[r][k]) > fabs(f[p][k])) p = r;
        for (int c = 0; c <= D; c++) { double t = f[k][c]; f[k][c] = f[p][c]; f[p][c] = t; }
        for (int r = k + 1; r < D; r++) {
            double q = f[r][k] / f[k][k];
            for (int c = k; c <= D; c++) f[r][c] -= q * f[k][c];
        }
    }
    for (int r = D - 1; r >= 0; r--) {
        double sum = f[r][D];
        for (int c = r + 1; c < D; c++) sum -= f[r][c] * x[c];
        x[r] = sum / f[r][r];
    }
}

static double relative_error(const float *w, const float *b, const double *want) {
    double num = 0, den = 0;
    for (int r = 0; r < OUT; r++)
        for (int c = 0; c <= IN; c++) {
            double got = c < IN ? w[r * IN + c] : b[r], ref = want[r * (IN + 1) + c];
            num += (got - ref) * (got - ref);
            den += ref * ref;
        }
    return sqrt(num / den);
}

static void test_static_functions(void) {
    CHECK(tengrad_version_number() == TENGRAD_VERSION_NUMBER);
    for (int s = -1; s <= 8; s++) CHECK(tengrad_status_string(s) != NULL && tengrad_status_string(s)[0] != '\0');
    CHECK(strcmp(tengrad_status_string(TENGRAD_OK), "ok") == 0);
    CHECK(strcmp(tengrad_status_string(42), "unknown status") == 0);
    CHECK_STATUS(tengrad_create(NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    tengrad_destroy(NULL);
    CHECK(tengrad_last_error(NULL) != NULL);
}

static void test_null_handle(void) {
    int32_t id = 0;
    double d = 0;
    int64_t n = 0;
    tengrad_conv2d_shape shape;
    tengrad_layer_stats stats;
    memset(&shape, 0, sizeof shape);
    CHECK_STATUS(tengrad_set_damping(NULL, 0.1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_get_damping(NULL, &d), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_memory_limit(NULL, 0), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_get_memory_limit(NULL, &n), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_linear(NULL, 2, 2, 1, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_conv2d(NULL, &shape, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_layer_count(NULL, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(NULL, 0, M, act, grads, 1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_precondition(NULL, 0, vw, vb, vw, vb), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_natural_gradient(NULL, 0, M, act, grads, 1, vw, vb), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_kl_clip_factor(NULL, 0.1, 0.01, &d), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_get_layer_stats(NULL, 0, &stats), TENGRAD_ERROR_INVALID_ARGUMENT);
}

static void test_settings_and_layers(void) {
    tengrad_preconditioner *p = NULL;
    CHECK_STATUS(tengrad_create(&p), TENGRAD_OK);
    double d = 0;
    CHECK_STATUS(tengrad_get_damping(p, &d), TENGRAD_OK);
    CHECK(d == 0.1);
    CHECK_STATUS(tengrad_set_damping(p, 0), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "damping") != NULL);
    CHECK_STATUS(tengrad_set_damping(p, -1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_damping(p, NAN), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_damping(p, INFINITY), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_get_damping(p, &d), TENGRAD_OK);
    CHECK(d == 0.1);
    CHECK(strcmp(tengrad_last_error(p), "") == 0); /* a success clears the message */
    CHECK_STATUS(tengrad_get_damping(p, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_memory_limit(p, -5), TENGRAD_ERROR_INVALID_ARGUMENT);
    int64_t limit = -1;
    CHECK_STATUS(tengrad_get_memory_limit(p, &limit), TENGRAD_OK);
    CHECK(limit == 0);

    int32_t id = -7;
    CHECK_STATUS(tengrad_add_linear(p, 0, 3, 1, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_linear(p, 3, -2, 1, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_linear(p, 3, 3, 2, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_linear(p, 3, 3, 1, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_linear(p, INT64_MAX, INT64_MAX, 1, &id), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_add_linear(p, (int64_t)1 << 40, 1, 0, &id), TENGRAD_ERROR_SHAPE);
    CHECK(id == -7); /* out-parameters untouched on failure */
    tengrad_conv2d_shape shape;
    memset(&shape, 0, sizeof shape);
    CHECK_STATUS(tengrad_add_conv2d(p, NULL, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_conv2d(p, &shape, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    int32_t count = -1;
    CHECK_STATUS(tengrad_layer_count(p, &count), TENGRAD_OK);
    CHECK(count == 0);
    CHECK_STATUS(tengrad_add_linear(p, 3, 3, 1, &id), TENGRAD_OK);
    CHECK(id == 0);
    CHECK_STATUS(tengrad_add_linear(p, 2, 5, 0, &id), TENGRAD_OK);
    CHECK(id == 1);
    CHECK_STATUS(tengrad_layer_count(p, &count), TENGRAD_OK);
    CHECK(count == 2);
    tengrad_layer_stats stats;
    CHECK_STATUS(tengrad_get_layer_stats(p, 1, &stats), TENGRAD_OK);
    CHECK(stats.kind == TENGRAD_LAYER_LINEAR && stats.parameters == 10 && stats.batch == 0);
    CHECK_STATUS(tengrad_get_layer_stats(p, 2, &stats), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_get_layer_stats(p, -1, &stats), TENGRAD_ERROR_INVALID_ARGUMENT);
    tengrad_destroy(p);
}

static void test_numerics_and_errors(void) {
    tengrad_preconditioner *p = NULL;
    int32_t layer = -1;
    const double lambda = 0.05, scale = 2.0;
    CHECK_STATUS(tengrad_create(&p), TENGRAD_OK);
    CHECK_STATUS(tengrad_set_damping(p, lambda), TENGRAD_OK);
    CHECK_STATUS(tengrad_add_linear(p, IN, OUT, 1, &layer), TENGRAD_OK);

    float w[OUT * IN], b[OUT], w2[OUT * IN], b2[OUT];
    /* Before any curvature: state error, outputs untouched. */
    for (int i = 0; i < OUT * IN; i++) w[i] = 7;
    CHECK_STATUS(tengrad_precondition(p, layer, vw, vb, w, b), TENGRAD_ERROR_STATE);
    CHECK(strlen(tengrad_last_error(p)) > 0);
    CHECK(w[0] == 7);

    /* One-call natural gradient against the oracle (tolerance: SPEC bound 1e-3). */
    CHECK_STATUS(tengrad_natural_gradient(p, layer, M, act, grads, (float)scale, w, b), TENGRAD_OK);
    double mean[D], want[D];
    for (int r = 0; r < OUT; r++)
        for (int c = 0; c <= IN; c++) {
            double sum = 0;
            for (int i = 0; i < M; i++) sum += scale * grads[i * OUT + r] * (c < IN ? act[i * IN + c] : 1.0);
            mean[r * (IN + 1) + c] = sum / M;
        }
    oracle(lambda, scale, mean, want);
    CHECK(relative_error(w, b, want) < 1e-3);

    /* Reuse path on another gradient, and in place. */
    double v[D];
    for (int r = 0; r < OUT; r++)
        for (int c = 0; c <= IN; c++) v[r * (IN + 1) + c] = c < IN ? vw[r * IN + c] : vb[r];
    oracle(lambda, scale, v, want);
    CHECK_STATUS(tengrad_precondition(p, layer, vw, vb, w, b), TENGRAD_OK);
    CHECK(relative_error(w, b, want) < 1e-3);
    memcpy(w2, vw, sizeof w2);
    memcpy(b2, vb, sizeof b2);
    CHECK_STATUS(tengrad_precondition(p, layer, w2, b2, w2, b2), TENGRAD_OK);
    CHECK(memcmp(w, w2, sizeof w) == 0 && memcmp(b, b2, sizeof b) == 0);

    /* Bias pointers must be NULL exactly when the layer has no bias. */
    CHECK_STATUS(tengrad_precondition(p, layer, vw, NULL, w2, b2), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_precondition(p, layer, vw, vb, w2, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_precondition(p, layer, NULL, vb, w2, b2), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_precondition(p, layer, vw, vb, NULL, b2), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_precondition(p, 3, vw, vb, w2, b2), TENGRAD_ERROR_INVALID_ARGUMENT);

    /* Every rejected curvature update leaves the snapshot as it was. */
    float bad[M * IN];
    memcpy(bad, act, sizeof bad);
    bad[3] = NAN;
    CHECK_STATUS(tengrad_update_curvature(p, layer, M, bad, grads, 1), TENGRAD_ERROR_NOT_FINITE);
    bad[3] = -INFINITY;
    for (int i = 0; i < OUT * IN; i++) w2[i] = 9;
    CHECK_STATUS(tengrad_natural_gradient(p, layer, M, bad, grads, 1, w2, b2), TENGRAD_ERROR_NOT_FINITE);
    CHECK(w2[0] == 9 && w2[OUT * IN - 1] == 9);
    for (int i = 0; i < M * IN; i++) bad[i] = act[i] * 1e30f;
    CHECK_STATUS(tengrad_update_curvature(p, layer, M, bad, grads, 1), TENGRAD_ERROR_NUMERICAL);
    CHECK_STATUS(tengrad_update_curvature(p, layer, M, NULL, grads, 1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(p, layer, M, act, NULL, 1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(p, layer, 0, act, grads, 1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(p, layer, -3, act, grads, 1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(p, layer, INT64_MAX / 2, act, grads, 1), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_update_curvature(p, layer, M, act, grads, 0), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(p, layer, M, act, grads, NAN), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(p, 99, M, act, grads, 1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_memory_limit(p, 64), TENGRAD_OK);
    static float big_act[(M + 100) * IN], big_grads[(M + 100) * OUT];
    CHECK_STATUS(tengrad_update_curvature(p, layer, M + 100, big_act, big_grads, 1), TENGRAD_ERROR_OUT_OF_MEMORY);
    CHECK(strstr(tengrad_last_error(p), "bytes") != NULL);
    CHECK_STATUS(tengrad_set_memory_limit(p, 0), TENGRAD_OK);
    CHECK_STATUS(tengrad_precondition(p, layer, vw, vb, w2, b2), TENGRAD_OK);
    CHECK(memcmp(w, w2, sizeof w) == 0 && memcmp(b, b2, sizeof b) == 0);

    /* Diagnostics and KL clipping. */
    tengrad_layer_stats stats;
    CHECK_STATUS(tengrad_get_layer_stats(p, layer, &stats), TENGRAD_OK);
    CHECK(stats.batch == M && stats.damping == lambda && stats.rcond > 0 && stats.rcond <= 1);
    CHECK(stats.snapshot_bytes >= (int64_t)(sizeof(float) * M * (IN + OUT)));
    CHECK(stats.curvature_flops > 0 && stats.update_flops > 0 && stats.update_dot_grad > 0);
    double nu = -1;
    CHECK_STATUS(tengrad_kl_clip_factor(p, 0, 0.01, &nu), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_kl_clip_factor(p, 0.1, -1, &nu), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_kl_clip_factor(p, 0.1, 0.01, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(nu == -1);
    CHECK_STATUS(tengrad_kl_clip_factor(p, 0.1, 1e-6, &nu), TENGRAD_OK);
    CHECK(nu > 0 && nu < 1);
    double dot = 0;
    for (int i = 0; i < D; i++) dot += v[i] * (i % (IN + 1) < IN ? w[(i / (IN + 1)) * IN + i % (IN + 1)] : b[i / (IN + 1)]);
    CHECK(fabs(nu - sqrt(1e-6 / (0.01 * dot))) < 1e-4 * nu);
    tengrad_destroy(p);
}

int main(void) {
    fill(act, M * IN, 1);
    fill(grads, M * OUT, 2);
    fill(vw, OUT * IN, 3);
    fill(vb, OUT, 4);
    test_static_functions();
    test_null_handle();
    test_settings_and_layers();
    test_numerics_and_errors();
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
