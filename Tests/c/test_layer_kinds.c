/*
 * Layer kinds beyond linear and conv2d, through the C ABI, against a dense float64 oracle written
 * here: the affine kind (LayerNorm / RMSNorm's γ, β) over token sequences with a padding mask —
 * natural gradient, precondition after a curvature update, per-sample rows, a saved and restored
 * handle — and its refusals, each leaving the saved state byte for byte as it was; the embedding
 * kind (nn.Embedding: token ids in, dense one-hot rows in the oracle only) the same way, with
 * token ids out of range refused.
 * Compiled as C11 and C++17 with -Werror.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tengrad.h"
#include "check.h"
#include "oracle.h"

enum { M = 5, T = 3, F = 4, DA = 2 * F };

static float x[M * T * F], g[M * T * F], vw[F], vb[F];
static uint8_t mask[M * T];
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

static double rel_error(const float *w, const float *b, const double *want, int d) {
    double num = 0, den = 0;
    for (int k = 0; k < d; k++) {
        double got = (k < F || !b) ? w[k] : b[k - F];
        num += (got - want[k]) * (got - want[k]);
        den += want[k] * want[k];
    }
    return sqrt(num / den);
}

static void test_affine(int has_bias) {
    const double scale = 2.0, damping = 0.05;
    int d = has_bias ? 2 * F : F;
    double u[M * DA], mean[DA], want[DA], v[DA];
    memset(u, 0, sizeof u);
    for (int i = 0; i < M; i++)
        for (int t = 0; t < T; t++)
            if (mask[i * T + t])
                for (int f = 0; f < F; f++) {
                    int k = (i * T + t) * F + f;
                    u[i * d + f] += scale * g[k] * x[k];
                    if (has_bias) u[i * d + F + f] += scale * g[k];
                }
    for (int k = 0; k < d; k++) {
        mean[k] = 0;
        for (int i = 0; i < M; i++) mean[k] += u[i * d + k] / M;
        v[k] = k < F ? vw[k] : vb[k - F];
    }
    tengrad_preconditioner *p = NULL;
    int32_t layer = -1;
    CHECK(tengrad_create(&p) == TENGRAD_OK && tengrad_set_damping(p, damping) == TENGRAD_OK);
    CHECK(tengrad_add_affine(p, F, has_bias, &layer) == TENGRAD_OK && layer == 0);
    tengrad_layer_arrays arr;
    memset(&arr, 0, sizeof arr);
    arr.size = sizeof arr;
    CHECK(tengrad_get_layer_arrays(p, layer, &arr) == TENGRAD_OK && arr.activation_rank == 1 &&
          arr.activation_dims[0] == F && arr.weight_rank == 1 && arr.weight_dims[0] == F &&
          arr.bias_rank == (has_bias ? 1 : 0));

    tengrad_batch b = TENGRAD_BATCH_INIT;
    b.batch = M;
    b.tokens = T;
    b.activations = x;
    b.output_grads = g;
    b.mask = mask;
    b.grad_scale = scale;
    float w_up[F], b_up[F];
    CHECK(tengrad_natural_gradient_v2(p, layer, &b, w_up, has_bias ? b_up : NULL) == TENGRAD_OK);
    oracle_solve(u, M, d, damping, mean, want);
    CHECK(rel_error(w_up, b_up, want, d) < 1e-4);
    float rows[M * DA];
    CHECK(tengrad_per_sample_gradients_v2(p, layer, &b, rows) == TENGRAD_OK);
    double worst = 0;
    for (int k = 0; k < M * d; k++) worst = fmax(worst, fabs(rows[k] - u[k]));
    CHECK(worst < 1e-5);

    CHECK(tengrad_update_curvature_v2(p, layer, &b) == TENGRAD_OK);
    CHECK(tengrad_precondition(p, layer, vw, has_bias ? vb : NULL, w_up, has_bias ? b_up : NULL) == TENGRAD_OK);
    oracle_solve(u, M, d, damping, v, want);
    CHECK(rel_error(w_up, b_up, want, d) < 1e-4);
    tengrad_layer_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK(tengrad_get_layer_stats(p, layer, &st) == TENGRAD_OK && st.kind == TENGRAD_LAYER_AFFINE &&
          st.parameters == d && st.batch == M && st.conv_strategy == TENGRAD_CONV_EXPLICIT);

    /* Saved and restored into a fresh handle: the same layer and the same update, bit for bit. */
    size_t n = save(p, before);
    tengrad_preconditioner *q = NULL;
    float w2[F], b2[F];
    CHECK(tengrad_create(&q) == TENGRAD_OK && tengrad_load_state(q, before, n) == TENGRAD_OK);
    CHECK(tengrad_precondition(q, layer, vw, has_bias ? vb : NULL, w2, has_bias ? b2 : NULL) == TENGRAD_OK);
    CHECK(memcmp(w2, w_up, sizeof w2) == 0 && (!has_bias || memcmp(b2, b_up, sizeof b2) == 0));
    tengrad_destroy(q);

    /* Refusals change nothing. */
    float bad[M * T * F];
    memcpy(bad, x, sizeof bad);
    bad[7] = NAN;
    tengrad_batch nb = b;
    nb.activations = bad;
    nb.mask = NULL;
    CHECK(tengrad_update_curvature_v2(p, layer, &nb) == TENGRAD_ERROR_NOT_FINITE);
    uint8_t two[M * T];
    memcpy(two, mask, sizeof two);
    two[4] = 2;
    nb = b;
    nb.mask = two;
    CHECK(tengrad_update_curvature_v2(p, layer, &nb) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_precondition(p, layer, vw, has_bias ? NULL : vb, w_up, has_bias ? NULL : b_up) == TENGRAD_ERROR_INVALID_ARGUMENT);
    int32_t other = -1;
    CHECK(tengrad_add_affine(p, 0, 1, &other) == TENGRAD_ERROR_INVALID_ARGUMENT && other == -1);
    CHECK(tengrad_add_affine(p, F, 2, &other) == TENGRAD_ERROR_INVALID_ARGUMENT && other == -1);
    CHECK(tengrad_add_affine(p, F, 1, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);
    tengrad_destroy(p);
}

enum { V = 6, VD = V * F };
static float ids[M * T], ev[VD];

static void test_embedding(void) {
    const double scale = 3.0, damping = 0.02;
    static double u[M * VD], mean[VD], want[VD], v[VD];
    memset(u, 0, sizeof u);
    for (int i = 0; i < M; i++)
        for (int t = 0; t < T; t++)
            if (mask[i * T + t])
                for (int f = 0; f < F; f++) u[i * VD + (int)ids[i * T + t] * F + f] += scale * g[(i * T + t) * F + f];
    for (int k = 0; k < VD; k++) {
        mean[k] = 0;
        for (int i = 0; i < M; i++) mean[k] += u[i * VD + k] / M;
        v[k] = ev[k];
    }
    tengrad_preconditioner *p = NULL;
    int32_t layer = -1;
    CHECK(tengrad_create(&p) == TENGRAD_OK && tengrad_set_damping(p, damping) == TENGRAD_OK);
    CHECK(tengrad_add_embedding(p, V, F, &layer) == TENGRAD_OK && layer == 0);
    tengrad_layer_arrays arr;
    memset(&arr, 0, sizeof arr);
    arr.size = sizeof arr;
    CHECK(tengrad_get_layer_arrays(p, layer, &arr) == TENGRAD_OK && arr.activation_rank == 0 &&
          arr.output_grad_rank == 1 && arr.output_grad_dims[0] == F && arr.weight_rank == 2 &&
          arr.weight_dims[0] == V && arr.weight_dims[1] == F && arr.bias_rank == 0);

    tengrad_batch b = TENGRAD_BATCH_INIT;
    b.batch = M;
    b.tokens = T;
    b.activations = ids;
    b.output_grads = g;
    b.mask = mask;
    b.grad_scale = scale;
    float w_up[VD];
    CHECK(tengrad_natural_gradient_v2(p, layer, &b, w_up, NULL) == TENGRAD_OK);
    oracle_solve(u, M, VD, damping, mean, want);
    CHECK(rel_error(w_up, NULL, want, VD) < 1e-4);
    static float rows[M * VD];
    CHECK(tengrad_per_sample_gradients_v2(p, layer, &b, rows) == TENGRAD_OK);
    double worst = 0;
    for (int k = 0; k < M * VD; k++) worst = fmax(worst, fabs(rows[k] - u[k]));
    CHECK(worst < 1e-5);
    CHECK(tengrad_update_curvature_v2(p, layer, &b) == TENGRAD_OK);
    CHECK(tengrad_precondition(p, layer, ev, NULL, w_up, NULL) == TENGRAD_OK);
    oracle_solve(u, M, VD, damping, v, want);
    CHECK(rel_error(w_up, NULL, want, VD) < 1e-4);
    tengrad_layer_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK(tengrad_get_layer_stats(p, layer, &st) == TENGRAD_OK && st.kind == TENGRAD_LAYER_EMBEDDING &&
          st.parameters == VD && st.batch == M);

    size_t n = save(p, before);
    tengrad_preconditioner *q = NULL;
    float w2[VD];
    CHECK(tengrad_create(&q) == TENGRAD_OK && tengrad_load_state(q, before, n) == TENGRAD_OK);
    CHECK(tengrad_precondition(q, layer, ev, NULL, w2, NULL) == TENGRAD_OK);
    CHECK(memcmp(w2, w_up, sizeof w2) == 0);
    tengrad_destroy(q);

    /* Ids out of range, negative, fractional or NaN: refused, nothing changes. */
    const float wrong[] = {(float)V, -1.0f, 0.5f, 1e20f, NAN};
    for (size_t k = 0; k < sizeof wrong / sizeof wrong[0]; k++) {
        float bad[M * T];
        memcpy(bad, ids, sizeof bad);
        bad[3] = wrong[k];  /* an unmasked token (padding holds anything) */
        tengrad_batch nb = b;
        nb.activations = bad;
        tengrad_status want_status = isnan(wrong[k]) ? TENGRAD_ERROR_NOT_FINITE : TENGRAD_ERROR_INVALID_ARGUMENT;
        CHECK(tengrad_update_curvature_v2(p, layer, &nb) == want_status);
        CHECK(tengrad_natural_gradient_v2(p, layer, &nb, w2, NULL) == want_status);
        CHECK(tengrad_per_sample_gradients_v2(p, layer, &nb, rows) == want_status);
    }
    CHECK(tengrad_precondition(p, layer, ev, ev, w_up, w2) == TENGRAD_ERROR_INVALID_ARGUMENT);
    int32_t other = -1;
    CHECK(tengrad_add_embedding(p, 0, F, &other) == TENGRAD_ERROR_INVALID_ARGUMENT && other == -1);
    CHECK(tengrad_add_embedding(p, (1 << 24) + 1, F, &other) == TENGRAD_ERROR_INVALID_ARGUMENT && other == -1);
    CHECK(tengrad_add_embedding(p, V, 0, &other) == TENGRAD_ERROR_INVALID_ARGUMENT && other == -1);
    CHECK(tengrad_add_embedding(p, V, F, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);
    tengrad_destroy(p);
}

int main(void) {
    fill(x, M * T * F, 3);
    fill(g, M * T * F, 4);
    fill(vw, F, 5);
    fill(vb, F, 6);
    for (int i = 0; i < M * T; i++) mask[i] = (uint8_t)(i % T < T - (i / T) % 2);  /* odd rows: last token padded */
    test_affine(1);
    test_affine(0);
    for (int i = 0; i < M * T; i++) ids[i] = (float)((i * 7 + i / T) % V);  /* ids repeat within and across samples */
    fill(ev, VD, 7);
    test_embedding();
    return report();
}
