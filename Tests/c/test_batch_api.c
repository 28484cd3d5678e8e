/*
 * The recommended C API of 0.5: one batch descriptor (tengrad_batch) taken by one entry point per
 * operation, per-layer settings through tengrad_set_layer_param / tengrad_get_layer_param, and a
 * `size` first in every public struct (tengrad_conv2d_shape and tengrad_layer_stats too).
 * The descriptor calls give the same bits as the plain and _tokens calls they replace (which are
 * now thin wrappers of them); the size rule refuses too-small structs and newer structs with
 * unknown fields set, and takes newer structs whose extra fields are zero; every refusal leaves the
 * handle's saved state byte for byte as it was. Compiled as C11 and C++17 with -Werror.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "tengrad.h"
#include "check.h"

enum { M = 6, IN = 4, OUT = 3, D = OUT * (IN + 1) };

static float act[M * IN], grads[M * OUT], vw[OUT * IN], vb[OUT];

static void fill(float *x, int n, unsigned seed) {
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        x[i] = (float)((int)((seed >> 8) % 2001) - 1000) / 500.0f;
    }
}

static int same(const float *a, const float *b, int n) { return memcmp(a, b, sizeof(float) * (size_t)n) == 0; }

static unsigned char before[1 << 15], after[1 << 15];

static size_t save(tengrad_preconditioner *p, unsigned char *buffer) {
    size_t n = 0;
    CHECK(tengrad_save_state(p, buffer, sizeof before, &n) == TENGRAD_OK);
    return n;
}

static tengrad_batch plain_batch(int64_t m, const float *a, const float *g, double scale) {
    tengrad_batch b = TENGRAD_BATCH_INIT;
    b.batch = m;
    b.activations = a;
    b.output_grads = g;
    b.grad_scale = scale;
    return b;
}

/* The descriptor calls equal the calls they replace, bit for bit. */
static void test_same_bits(void) {
    tengrad_preconditioner *p = NULL, *q = NULL;
    int32_t l = -1, k = -1;
    static float w1[OUT * IN], b1[OUT], w2[OUT * IN], b2[OUT], r1[M * D], r2[M * D];
    uint8_t mask[M] = {1, 1, 0, 1, 0, 1};
    CHECK(tengrad_create(&p) == TENGRAD_OK && tengrad_create(&q) == TENGRAD_OK);
    CHECK(tengrad_add_linear(p, IN, OUT, 1, &l) == TENGRAD_OK && tengrad_add_linear(q, IN, OUT, 1, &k) == TENGRAD_OK);
    tengrad_batch b = plain_batch(M, act, grads, (double)M);
    CHECK(tengrad_natural_gradient_v2(p, l, &b, w1, b1) == TENGRAD_OK);
    CHECK(tengrad_natural_gradient(q, k, M, act, grads, (float)M, w2, b2) == TENGRAD_OK);
    CHECK(same(w1, w2, OUT * IN) && same(b1, b2, OUT));
    CHECK(tengrad_update_curvature_v2(p, l, &b) == TENGRAD_OK);
    CHECK(tengrad_update_curvature(q, k, M, act, grads, (float)M) == TENGRAD_OK);
    CHECK(tengrad_precondition(p, l, vw, vb, w1, b1) == TENGRAD_OK);
    CHECK(tengrad_precondition(q, k, vw, vb, w2, b2) == TENGRAD_OK);
    CHECK(same(w1, w2, OUT * IN) && same(b1, b2, OUT));
    CHECK(tengrad_per_sample_gradients_v2(p, l, &b, r1) == TENGRAD_OK);
    CHECK(tengrad_per_sample_gradients(q, k, M, act, grads, (float)M, r2) == TENGRAD_OK);
    CHECK(same(r1, r2, M * D));
    /* one sequence of M tokens with padding */
    b.batch = 1;
    b.tokens = M;
    b.mask = mask;
    b.grad_scale = 1.0;
    CHECK(tengrad_natural_gradient_v2(p, l, &b, w1, b1) == TENGRAD_OK);
    CHECK(tengrad_natural_gradient_tokens(q, k, 1, M, act, grads, mask, 1.0f, w2, b2) == TENGRAD_OK);
    CHECK(same(w1, w2, OUT * IN) && same(b1, b2, OUT));
    CHECK(tengrad_per_sample_gradients_v2(p, l, &b, r1) == TENGRAD_OK);
    CHECK(tengrad_per_sample_gradients_tokens(q, k, 1, M, act, grads, mask, 1.0f, r2) == TENGRAD_OK);
    CHECK(same(r1, r2, D));
    size_t n1 = save(p, before), n2 = save(q, after);
    CHECK(n1 == n2 && memcmp(before, after, n1) == 0);  /* the two handles hold the same state */
    tengrad_destroy(p);
    tengrad_destroy(q);
}

/* A newer header's struct: this version's fields, then one more. */
typedef struct {
    tengrad_batch known;
    int64_t newer_field;
} newer_batch;

/* The size rule and the fields' checks; every refusal changes nothing. */
static void test_refusals(void) {
    tengrad_preconditioner *p = NULL;
    int32_t l = -1;
    static float w[OUT * IN], bias[OUT];
    CHECK(tengrad_create(&p) == TENGRAD_OK && tengrad_add_linear(p, IN, OUT, 1, &l) == TENGRAD_OK);
    tengrad_batch b = plain_batch(M, act, grads, (double)M);
    CHECK(tengrad_update_curvature_v2(p, l, &b) == TENGRAD_OK);
    size_t n = save(p, before);

    tengrad_batch small = b;
    small.size = sizeof small - 8;
    CHECK(tengrad_update_curvature_v2(p, l, &small) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "TENGRAD_BATCH_INIT") != NULL);
    small.size = 0;
    CHECK(tengrad_natural_gradient_v2(p, l, &small, w, bias) == TENGRAD_ERROR_INVALID_ARGUMENT);
    tengrad_batch huge = b;
    huge.size = (size_t)1 << 40;  /* an uninitialized size: refused without reading past the struct */
    CHECK(tengrad_update_curvature_v2(p, l, &huge) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_update_curvature_v2(p, l, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);

    newer_batch newer;
    memset(&newer, 0, sizeof newer);
    newer.known = plain_batch(M, act, grads, (double)M);
    newer.known.size = sizeof newer;
    newer.newer_field = 1;  /* a setting this library does not know: refused, not ignored */
    CHECK(tengrad_update_curvature_v2(p, l, &newer.known) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "does not know") != NULL);

    tengrad_batch bad = b;
    bad.grad_scale = 0.0;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_INVALID_ARGUMENT);
    bad.grad_scale = NAN;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_INVALID_ARGUMENT);
    bad.grad_scale = 1e300;  /* not a float */
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_INVALID_ARGUMENT);
    bad = b;
    bad.tokens = 0;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_INVALID_ARGUMENT);
    bad = b;
    bad.batch = 0;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_INVALID_ARGUMENT);
    bad = b;
    bad.activations = NULL;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_INVALID_ARGUMENT);
    bad = b;
    bad.batch = INT64_MAX / 2;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_SHAPE);
    uint8_t two[M] = {1, 2, 1, 1, 1, 1};
    bad = b;
    bad.batch = 1;
    bad.tokens = M;
    bad.mask = two;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_INVALID_ARGUMENT);
    float nan_act[M * IN];
    memcpy(nan_act, act, sizeof nan_act);
    nan_act[5] = NAN;
    bad = b;
    bad.activations = nan_act;
    CHECK(tengrad_update_curvature_v2(p, l, &bad) == TENGRAD_ERROR_NOT_FINITE);
    CHECK(tengrad_natural_gradient_v2(p, l, &b, NULL, bias) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_per_sample_gradients_v2(p, l, &b, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_update_curvature_v2(p, 9, &b) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);

    /* a newer struct whose extra field is at its zero default is this version's batch */
    newer.newer_field = 0;
    CHECK(tengrad_update_curvature_v2(p, l, &newer.known) == TENGRAD_OK);
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);  /* the same batch again: the same state */
    tengrad_destroy(p);
}

/* Layer settings by key: defaults, round trips, the old setters seen through the new getter,
   refusals that change nothing. */
static void test_layer_params(void) {
    tengrad_preconditioner *p = NULL;
    int32_t l = -1, c = -1;
    int64_t v = -1;
    CHECK(tengrad_create(&p) == TENGRAD_OK && tengrad_add_linear(p, IN, OUT, 1, &l) == TENGRAD_OK);
    tengrad_conv2d_shape cs = TENGRAD_CONV2D_SHAPE_INIT;
    cs.in_channels = 1; cs.out_channels = 2; cs.in_height = 3; cs.in_width = 3; cs.kernel_height = 2; cs.kernel_width = 2;
    cs.stride_height = 1; cs.stride_width = 1; cs.dilation_height = 1; cs.dilation_width = 1; cs.groups = 1;
    CHECK(tengrad_add_conv2d(p, &cs, &c) == TENGRAD_OK);
    CHECK(tengrad_get_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, &v) == TENGRAD_OK && v == TENGRAD_CONV_AUTO);
    CHECK(tengrad_get_layer_param(p, c, TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION, &v) == TENGRAD_OK &&
          v == TENGRAD_SNAPSHOT_AUTO);
    CHECK(tengrad_get_layer_param(p, l, TENGRAD_LAYER_PARAM_TOKEN_MODE, &v) == TENGRAD_OK &&
          v == TENGRAD_TOKENS_PER_SEQUENCE);
    CHECK(tengrad_set_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, TENGRAD_CONV_FACTORED) == TENGRAD_OK);
    CHECK(tengrad_get_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, &v) == TENGRAD_OK && v == TENGRAD_CONV_FACTORED);
    CHECK(tengrad_set_layer_param(p, c, TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION, TENGRAD_SNAPSHOT_RAW) == TENGRAD_OK);
    CHECK(tengrad_get_layer_param(p, c, TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION, &v) == TENGRAD_OK &&
          v == TENGRAD_SNAPSHOT_RAW);
    CHECK(tengrad_set_layer_param(p, l, TENGRAD_LAYER_PARAM_TOKEN_MODE, TENGRAD_TOKENS_PER_TOKEN) == TENGRAD_OK);
    CHECK(tengrad_get_layer_param(p, l, TENGRAD_LAYER_PARAM_TOKEN_MODE, &v) == TENGRAD_OK && v == TENGRAD_TOKENS_PER_TOKEN);
    CHECK(tengrad_set_conv_strategy(p, c, TENGRAD_CONV_EXPLICIT) == TENGRAD_OK);  /* the old setter, the same setting */
    CHECK(tengrad_get_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, &v) == TENGRAD_OK && v == TENGRAD_CONV_EXPLICIT);

    size_t n = save(p, before);
    CHECK(tengrad_set_layer_param(p, c, 0, 1) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "unknown layer parameter") != NULL);
    CHECK(tengrad_set_layer_param(p, c, 5, 1) == TENGRAD_ERROR_INVALID_ARGUMENT);  /* the first unknown key */
    CHECK(tengrad_set_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, 3) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, -1) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, (int64_t)1 << 33) ==
          TENGRAD_ERROR_INVALID_ARGUMENT);  /* not cut to 32 bits */
    CHECK(tengrad_set_layer_param(p, c, TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION, 7) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_param(p, c, TENGRAD_LAYER_PARAM_TOKEN_MODE, TENGRAD_TOKENS_PER_TOKEN) ==
          TENGRAD_ERROR_INVALID_ARGUMENT);  /* a conv layer has no token axis */
    CHECK(tengrad_set_layer_param(p, 5, TENGRAD_LAYER_PARAM_CONV_STRATEGY, TENGRAD_CONV_AUTO) ==
          TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_get_layer_param(p, c, 99, &v) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_get_layer_param(p, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_set_layer_param(NULL, c, TENGRAD_LAYER_PARAM_CONV_STRATEGY, 0) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);
    tengrad_destroy(p);
}

/* tengrad_conv2d_shape and tengrad_layer_stats carry `size` too (0.5): the same rule. */
typedef struct {
    tengrad_conv2d_shape known;
    int64_t newer_field;
} newer_shape;

static void test_struct_sizes(void) {
    tengrad_preconditioner *p = NULL;
    int32_t id = -1;
    CHECK(tengrad_create(&p) == TENGRAD_OK);
    tengrad_conv2d_shape s = TENGRAD_CONV2D_SHAPE_INIT;
    s.in_channels = 2; s.out_channels = 3; s.in_height = 5; s.in_width = 4; s.kernel_height = 3; s.kernel_width = 2;
    s.padding_height = 1; s.has_bias = 1;
    tengrad_conv2d_shape small = s;
    small.size = sizeof small - 16;
    CHECK(tengrad_add_conv2d(p, &small, &id) == TENGRAD_ERROR_INVALID_ARGUMENT && id == -1);
    CHECK(strstr(tengrad_last_error(p), "TENGRAD_CONV2D_SHAPE_INIT") != NULL);
    small.size = 0;
    CHECK(tengrad_add_conv2d(p, &small, &id) == TENGRAD_ERROR_INVALID_ARGUMENT);
    newer_shape newer;
    memset(&newer, 0, sizeof newer);
    newer.known = s;
    newer.known.size = sizeof newer;
    newer.newer_field = 3;
    CHECK(tengrad_add_conv2d(p, &newer.known, &id) == TENGRAD_ERROR_INVALID_ARGUMENT);
    int32_t count = -1;
    CHECK(tengrad_layer_count(p, &count) == TENGRAD_OK && count == 0);  /* nothing registered */
    newer.newer_field = 0;
    CHECK(tengrad_add_conv2d(p, &newer.known, &id) == TENGRAD_OK && id == 0);
    CHECK(tengrad_add_conv2d(p, &s, &id) == TENGRAD_OK && id == 1);

    tengrad_conv2d_shape back;
    memset(&back, 0, sizeof back);
    CHECK(tengrad_get_conv2d_shape(p, 1, &back) == TENGRAD_ERROR_INVALID_ARGUMENT);  /* size 0 */
    back.size = sizeof back;
    CHECK(tengrad_get_conv2d_shape(p, 1, &back) == TENGRAD_OK);
    CHECK(back.size == sizeof back && back.in_channels == 2 && back.kernel_width == 2 && back.padding_height == 1 &&
          back.stride_width == 1 && back.groups == 1 && back.has_bias == 1);

    /* the library's array shapes: a conv's output size, weight and bias; a linear layer's */
    tengrad_layer_arrays arr;
    memset(&arr, 0, sizeof arr);
    CHECK(tengrad_get_layer_arrays(p, 1, &arr) == TENGRAD_ERROR_INVALID_ARGUMENT);  /* size 0 */
    arr.size = sizeof arr;
    CHECK(tengrad_get_layer_arrays(p, 1, &arr) == TENGRAD_OK && arr.size == sizeof arr);
    /* 2→3, 5×4 input, 3×2 kernel, padding (1, 0): output (5 + 2 − 3 + 1) × (4 − 2 + 1) = 5 × 3 */
    CHECK(arr.activation_rank == 3 && arr.activation_dims[0] == 2 && arr.activation_dims[1] == 5 &&
          arr.activation_dims[2] == 4);
    CHECK(arr.output_grad_rank == 3 && arr.output_grad_dims[0] == 3 && arr.output_grad_dims[1] == 5 &&
          arr.output_grad_dims[2] == 3);
    CHECK(arr.weight_rank == 4 && arr.weight_dims[0] == 3 && arr.weight_dims[1] == 2 && arr.weight_dims[2] == 3 &&
          arr.weight_dims[3] == 2);
    CHECK(arr.bias_rank == 1 && arr.bias_dims[0] == 3);
    int32_t lin = -1;
    CHECK(tengrad_add_linear(p, 7, 4, 0, &lin) == TENGRAD_OK);
    CHECK(tengrad_get_layer_arrays(p, lin, &arr) == TENGRAD_OK);
    CHECK(arr.activation_rank == 1 && arr.activation_dims[0] == 7 && arr.output_grad_rank == 1 &&
          arr.output_grad_dims[0] == 4 && arr.weight_rank == 2 && arr.weight_dims[0] == 4 && arr.weight_dims[1] == 7 &&
          arr.bias_rank == 0);
    CHECK(tengrad_get_layer_arrays(p, 9, &arr) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_get_layer_arrays(p, 0, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);

    tengrad_layer_stats st;
    memset(&st, 0, sizeof st);
    st.kind = 77;
    CHECK(tengrad_get_layer_stats(p, 1, &st) == TENGRAD_ERROR_INVALID_ARGUMENT && st.kind == 77);  /* size 0: untouched */
    st.size = sizeof st - 8;
    CHECK(tengrad_get_layer_stats(p, 1, &st) == TENGRAD_ERROR_INVALID_ARGUMENT && st.kind == 77);
    struct { tengrad_layer_stats known; int64_t newer_field; } larger;
    memset(&larger, 0, sizeof larger);
    larger.known.size = sizeof larger;
    larger.newer_field = -9;
    CHECK(tengrad_get_layer_stats(p, 1, &larger.known) == TENGRAD_OK);  /* fills what it knows */
    CHECK(larger.known.size == sizeof larger.known && larger.known.kind == TENGRAD_LAYER_CONV2D &&
          larger.known.parameters == 3 * 2 * 3 * 2 + 3 && larger.newer_field == -9);
    tengrad_destroy(p);
}

/* The handle-free data-parallel helpers: the greedy owner map and ν from a global sum. */
static void test_data_parallel_helpers(void) {
    const int64_t costs[5] = {10, 40, 40, 5, 30};
    int32_t owners[5] = {-1, -1, -1, -1, -1};
    CHECK(tengrad_assign_owners(costs, 5, 2, owners) == TENGRAD_OK);
    /* by cost: 40 (layer 1) -> 0, 40 (2) -> 1, 30 (4) -> 0 (40 vs 40: lowest), 10 (0) -> 1, 5 (3) -> 1 */
    CHECK(owners[1] == 0 && owners[2] == 1 && owners[4] == 0 && owners[0] == 1 && owners[3] == 1);
    CHECK(tengrad_assign_owners(costs, 5, 1, owners) == TENGRAD_OK);
    CHECK(owners[0] == 0 && owners[1] == 0 && owners[4] == 0);
    CHECK(tengrad_assign_owners(costs, 5, 8, owners) == TENGRAD_OK);
    CHECK(owners[1] == 0 && owners[2] == 1 && owners[4] == 2 && owners[0] == 3 && owners[3] == 4);
    const int64_t negative[2] = {3, -1};
    owners[0] = -7;
    CHECK(tengrad_assign_owners(negative, 2, 2, owners) == TENGRAD_ERROR_INVALID_ARGUMENT && owners[0] == -7);
    CHECK(tengrad_assign_owners(costs, 5, 0, owners) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_assign_owners(costs, -1, 2, owners) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_assign_owners(NULL, 5, 2, owners) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_assign_owners(costs, 5, 2, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);

    double nu = -1;
    CHECK(tengrad_kl_clip_from_sum(0.1, 1e-3, 4.0, &nu) == TENGRAD_OK && fabs(nu - sqrt(1e-3 / (0.01 * 4.0))) < 1e-15);
    CHECK(tengrad_kl_clip_from_sum(0.1, 1e-3, 1e-6, &nu) == TENGRAD_OK && nu == 1.0);  /* small sum: not clipped */
    CHECK(tengrad_kl_clip_from_sum(0.1, 1e-3, -2.0, &nu) == TENGRAD_OK && nu == 1.0);
    CHECK(tengrad_kl_clip_from_sum(0.0, 1e-3, 4.0, &nu) == TENGRAD_OK && nu == 1.0);   /* lr 0: nothing to clip */
    nu = -1;
    CHECK(tengrad_kl_clip_from_sum(0.1, 0.0, 4.0, &nu) == TENGRAD_ERROR_INVALID_ARGUMENT && nu == -1);
    CHECK(tengrad_kl_clip_from_sum(-0.1, 1e-3, 4.0, &nu) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_kl_clip_from_sum(0.1, 1e-3, NAN, &nu) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_kl_clip_from_sum(INFINITY, 1e-3, 4.0, &nu) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_kl_clip_from_sum(0.1, 1e-3, 4.0, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);
}

/* The two-phase precondition: prepare + finish at scale 1 gives tengrad_precondition's bits (out
   of place and in place) and the same ν; a scale multiplies the update; the refusals (no prepare,
   a finish already done, null or overlapping arrays, a scale that is not finite) leave the
   outputs and the saved state as they were. */
static void test_two_phase(void) {
    tengrad_preconditioner *p = NULL;
    int32_t l = -1;
    float w1[OUT * IN], b1[OUT], w2[OUT * IN], b2[OUT], iw[OUT * IN], ib[OUT];
    double nu1 = 0, nu2 = 0, dot1 = 0;
    CHECK(tengrad_create(&p) == TENGRAD_OK && tengrad_add_linear(p, IN, OUT, 1, &l) == TENGRAD_OK);
    CHECK(tengrad_update_curvature(p, l, M, act, grads, (float)M) == TENGRAD_OK);
    CHECK(tengrad_precondition_finish(p, l, vw, vb, 1.0, w2, b2) == TENGRAD_ERROR_STATE);  /* nothing prepared */

    CHECK(tengrad_precondition(p, l, vw, vb, w1, b1) == TENGRAD_OK);
    CHECK(tengrad_kl_clip_factor(p, 0.5, 1e-6, &nu1) == TENGRAD_OK);
    tengrad_layer_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK(tengrad_get_layer_stats(p, l, &st) == TENGRAD_OK);
    dot1 = st.update_dot_grad;

    CHECK(tengrad_precondition_prepare(p, l, vw, vb) == TENGRAD_OK);
    CHECK(tengrad_kl_clip_factor(p, 0.5, 1e-6, &nu2) == TENGRAD_OK && nu2 == nu1 && nu1 < 1);
    size_t n = save(p, before);
    for (int i = 0; i < OUT * IN; i++) w2[i] = 7;
    CHECK(tengrad_precondition_finish(p, l, NULL, vb, 1.0, w2, b2) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_precondition_finish(p, l, vw, vb, 1.0, NULL, b2) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_precondition_finish(p, l, vw, vb, NAN, w2, b2) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_precondition_finish(p, l, vw, vb, INFINITY, w2, b2) == TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(tengrad_precondition_finish(p, l, vw, vb, 1.0, w2, w2 + 1) == TENGRAD_ERROR_INVALID_ARGUMENT);  /* overlap */
    CHECK(tengrad_precondition_finish(p, 99, vw, vb, 1.0, w2, b2) != TENGRAD_OK);
    CHECK(w2[0] == 7 && w2[OUT * IN - 1] == 7);
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);
    CHECK(tengrad_precondition_finish(p, l, vw, vb, 1.0, w2, b2) == TENGRAD_OK);
    CHECK(same(w1, w2, OUT * IN) && same(b1, b2, OUT));
    CHECK(tengrad_precondition_finish(p, l, vw, vb, 1.0, w2, b2) == TENGRAD_ERROR_STATE);  /* spent */

    /* In place, scaled by ν: the update times ν; ⟨update, grad⟩ stays the unscaled update's. */
    memcpy(iw, vw, sizeof iw);
    memcpy(ib, vb, sizeof ib);
    CHECK(tengrad_precondition_prepare(p, l, iw, ib) == TENGRAD_OK);
    CHECK(tengrad_precondition_finish(p, l, iw, ib, nu1, iw, ib) == TENGRAD_OK);
    double err = 0, norm = 0;
    for (int i = 0; i < OUT * IN; i++) {
        err += ((double)iw[i] - nu1 * w1[i]) * ((double)iw[i] - nu1 * w1[i]);
        norm += nu1 * w1[i] * nu1 * w1[i];
    }
    CHECK(sqrt(err / norm) < 1e-6);
    CHECK(tengrad_get_layer_stats(p, l, &st) == TENGRAD_OK && st.update_dot_grad == dot1);  /* the unscaled update's */
    /* A prepare with NaN is refused and changes nothing. */
    float bad[OUT * IN];
    memcpy(bad, vw, sizeof bad);
    bad[2] = NAN;
    n = save(p, before);
    CHECK(tengrad_precondition_prepare(p, l, bad, vb) == TENGRAD_ERROR_NOT_FINITE);
    CHECK(tengrad_precondition_prepare(p, l, vw, NULL) == TENGRAD_ERROR_INVALID_ARGUMENT);  /* the layer has a bias */
    CHECK(save(p, after) == n && memcmp(before, after, n) == 0);
    tengrad_destroy(p);
}

int main(void) {
    fill(act, M * IN, 11);
    fill(grads, M * OUT, 12);
    fill(vw, OUT * IN, 13);
    fill(vb, OUT, 14);
    test_same_bits();
    test_refusals();
    test_layer_params();
    test_struct_sizes();
    test_data_parallel_helpers();
    test_two_phase();
    return report();
}
