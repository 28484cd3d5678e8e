/*
 * The diagonal base through the C ABI (tengrad_set_layer_base): a linear layer's block F + λE
 * against the dense float64 oracle (F + λ diag(e))⁻¹ — precondition after a curvature update, in
 * place, a new damping, the one-call natural gradient, a saved and restored handle — then every
 * refusal (NaN, Inf, zero, negative, subnormal, a missing or unexpected bias base, an unknown
 * layer, the memory limit), each leaving the saved state byte for byte as it was, and clearing;
 * relative damping (TENGRAD_LAYER_PARAM_DAMPING_MODE) against the oracle with λ · tr(E⁻¹F)/min(m, d).
 * Compiled as C11 and C++17 with -Werror.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tengrad.h"
#include "check.h"
#include "oracle.h"

enum { M = 6, IN = 4, OUT = 3, W = OUT * IN, D = OUT * (IN + 1) };

static float a[M * IN], g[M * OUT], ew[W], eb[OUT], vw[W], vb[OUT];
static unsigned char before[1 << 14], after[1 << 14];

static void fill(float *v, int n, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        v[i] = (float)((int)((seed >> 8) % 2001) - 1000) / 500.0f;
    }
}

static size_t save(tengrad_preconditioner *p, unsigned char *buffer) {
    size_t n = 0;
    CHECK(tengrad_save_state(p, buffer, sizeof before, &n) == TENGRAD_OK);
    return n;
}

/* [W | b] row by row: the oracle's order. */
static void joined(const float *w, const float *b, double *out) {
    for (int o = 0; o < OUT; o++) {
        for (int i = 0; i < IN; i++) out[o * (IN + 1) + i] = w[o * IN + i];
        out[o * (IN + 1) + IN] = b[o];
    }
}

static double rel_error(const float *w, const float *b, const double *want) {
    double got[D], num = 0, den = 0;
    joined(w, b, got);
    for (int k = 0; k < D; k++) {
        num += (got[k] - want[k]) * (got[k] - want[k]);
        den += want[k] * want[k];
    }
    return sqrt(num / den);
}

int main(void) {
    const double scale = 2.0;
    fill(a, M * IN, 1);
    fill(g, M * OUT, 2);
    fill(vw, W, 3);
    fill(vb, OUT, 4);
    fill(ew, W, 5);
    fill(eb, OUT, 6);
    for (int k = 0; k < W; k++) ew[k] = (float)pow(10.0, 1.5 * ew[k] / 2);  /* 10^±1.5 */
    for (int k = 0; k < OUT; k++) eb[k] = (float)pow(10.0, 1.5 * eb[k] / 2);
    double u[M * D], e[D], v[D], mean[D], want[D];
    for (int i = 0; i < M; i++)
        for (int o = 0; o < OUT; o++)
            for (int k = 0; k <= IN; k++)
                u[i * D + o * (IN + 1) + k] = scale * g[i * OUT + o] * (k < IN ? a[i * IN + k] : 1.0);
    for (int k = 0; k < D; k++) {
        mean[k] = 0;
        for (int i = 0; i < M; i++) mean[k] += u[i * D + k] / M;
    }
    joined(ew, eb, e);
    joined(vw, vb, v);

    tengrad_preconditioner *p = NULL;
    int32_t layer = -1, has = -1;
    CHECK(tengrad_create(&p) == TENGRAD_OK && tengrad_set_damping(p, 0.05) == TENGRAD_OK);
    CHECK(tengrad_add_linear(p, IN, OUT, 1, &layer) == TENGRAD_OK);
    CHECK(tengrad_get_layer_base(p, layer, &has) == TENGRAD_OK && has == 0);
    CHECK(tengrad_set_layer_base(p, layer, ew, eb) == TENGRAD_OK);
    CHECK(tengrad_get_layer_base(p, layer, &has) == TENGRAD_OK && has == 1);
    CHECK(tengrad_update_curvature(p, layer, M, a, g, (float)scale) == TENGRAD_OK);
    float wu[W], bu[OUT];
    CHECK(tengrad_precondition(p, layer, vw, vb, wu, bu) == TENGRAD_OK);
    oracle_solve_base(u, M, D, 0.05, e, v, want);
    CHECK(rel_error(wu, bu, want) < 1e-4);
    /* In place: the same bits. */
    float iw[W], ib[OUT];
    memcpy(iw, vw, sizeof iw);
    memcpy(ib, vb, sizeof ib);
    CHECK(tengrad_precondition(p, layer, iw, ib, iw, ib) == TENGRAD_OK);
    CHECK(memcmp(iw, wu, sizeof iw) == 0 && memcmp(ib, bu, sizeof ib) == 0);
    /* λ is still a shift of the m×m system. */
    CHECK(tengrad_set_damping(p, 0.3) == TENGRAD_OK);
    CHECK(tengrad_precondition(p, layer, vw, vb, wu, bu) == TENGRAD_OK);
    oracle_solve_base(u, M, D, 0.3, e, v, want);
    CHECK(rel_error(wu, bu, want) < 1e-4);
    CHECK(tengrad_natural_gradient(p, layer, M, a, g, (float)scale, wu, bu) == TENGRAD_OK);
    oracle_solve_base(u, M, D, 0.3, e, mean, want);
    CHECK(rel_error(wu, bu, want) < 1e-4);
    CHECK(tengrad_precondition(p, layer, vw, vb, wu, bu) == TENGRAD_OK);

    /* Saved and restored into a fresh handle: the base and the same update, bit for bit. */
    size_t n = save(p, before);
    tengrad_preconditioner *q = NULL;
    float w2[W], b2[OUT];
    CHECK(tengrad_create(&q) == TENGRAD_OK && tengrad_load_state(q, before, n) == TENGRAD_OK);
    CHECK(tengrad_get_layer_base(q, layer, &has) == TENGRAD_OK && has == 1);
    CHECK(tengrad_precondition(q, layer, vw, vb, w2, b2) == TENGRAD_OK);
    CHECK(memcmp(w2, wu, sizeof w2) == 0 && memcmp(b2, bu, sizeof b2) == 0);
    tengrad_destroy(q);

    /* Refusals change nothing. */
    const float values[] = {NAN, INFINITY, 0.0f, -1.0f, 1e-40f};
    const tengrad_status codes[] = {TENGRAD_ERROR_NOT_FINITE, TENGRAD_ERROR_NOT_FINITE, TENGRAD_ERROR_INVALID_ARGUMENT,
                                    TENGRAD_ERROR_INVALID_ARGUMENT, TENGRAD_ERROR_INVALID_ARGUMENT};
    for (int c = 0; c < 5; c++) {
        float bad[W], bad_b[OUT];
        memcpy(bad, ew, sizeof bad);
        memcpy(bad_b, eb, sizeof bad_b);
        bad[5] = values[c];
        CHECK(tengrad_set_layer_base(p, layer, bad, eb) == codes[c]);
        bad_b[1] = values[c];
        CHECK(tengrad_set_layer_base(p, layer, ew, bad_b) == codes[c]);
    }
    CHECK(tengrad_set_layer_base(p, layer, ew, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_base(p, layer, NULL, eb) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_base(p, 7, ew, eb) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_base(NULL, layer, ew, eb) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_get_layer_base(p, layer, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);

    /* The base's copy counts against the memory limit. */
    int64_t in_use = 0;
    CHECK(tengrad_get_memory_usage(p, &in_use) == TENGRAD_OK);
    CHECK(tengrad_set_memory_limit(p, in_use + 8) == TENGRAD_OK);
    CHECK(tengrad_set_layer_base(p, layer, ew, eb) == TENGRAD_ERROR_OUT_OF_MEMORY);
    CHECK(tengrad_set_memory_limit(p, 0) == TENGRAD_OK);

    /* Relative damping: λ · tr(F)/min(m, d) of the next snapshot (here of E⁻¹F: the base is set). */
    int64_t mode = -1;
    CHECK(tengrad_get_layer_param(p, layer, TENGRAD_LAYER_PARAM_DAMPING_MODE, &mode) == TENGRAD_OK &&
          mode == TENGRAD_DAMPING_ABSOLUTE);
    CHECK(tengrad_set_layer_param(p, layer, TENGRAD_LAYER_PARAM_DAMPING_MODE, 2) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_param(p, layer, TENGRAD_LAYER_PARAM_DAMPING_MODE, TENGRAD_DAMPING_RELATIVE) == TENGRAD_OK);
    CHECK(tengrad_get_layer_param(p, layer, TENGRAD_LAYER_PARAM_DAMPING_MODE, &mode) == TENGRAD_OK &&
          mode == TENGRAD_DAMPING_RELATIVE);
    CHECK(tengrad_update_curvature(p, layer, M, a, g, (float)scale) == TENGRAD_OK);
    double trace = 0;
    for (int i = 0; i < M; i++)
        for (int k = 0; k < D; k++) trace += u[i * D + k] * u[i * D + k] / e[k];
    double relative = 0.3 * trace / M / (M < D ? M : D);
    tengrad_layer_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK(tengrad_get_layer_stats(p, layer, &st) == TENGRAD_OK && fabs(st.damping - relative) <= 1e-6 * relative);
    CHECK(tengrad_precondition(p, layer, vw, vb, wu, bu) == TENGRAD_OK);
    oracle_solve_base(u, M, D, relative, e, v, want);
    CHECK(rel_error(wu, bu, want) < 1e-4);
    CHECK(tengrad_set_layer_param(p, layer, TENGRAD_LAYER_PARAM_DAMPING_MODE, TENGRAD_DAMPING_ABSOLUTE) == TENGRAD_OK);

    /* Clearing: the next snapshot is the plain block. */
    CHECK(tengrad_set_layer_base(p, layer, NULL, NULL) == TENGRAD_OK);
    CHECK(tengrad_get_layer_base(p, layer, &has) == TENGRAD_OK && has == 0);
    CHECK(tengrad_update_curvature(p, layer, M, a, g, (float)scale) == TENGRAD_OK);
    CHECK(tengrad_precondition(p, layer, vw, vb, wu, bu) == TENGRAD_OK);
    oracle_solve_base(u, M, D, 0.3, NULL, v, want);
    CHECK(rel_error(wu, bu, want) < 1e-4);
    tengrad_destroy(p);
    return report();
}
