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
#include "check.h"
#include "oracle.h"



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

/* Dense oracle (oracle.h) of u_i = s g_i ⊗ [a_i; 1]; v and the result are [W | b] row by row. */
static void oracle(double lambda, double s, const double *v, double *x) {
    double u[M][D];
    for (int i = 0; i < M; i++)
        for (int r = 0; r < OUT; r++)
            for (int c = 0; c <= IN; c++)
                u[i][r * (IN + 1) + c] = s * grads[i * OUT + r] * (c < IN ? act[i * IN + c] : 1.0);
    oracle_solve(&u[0][0], M, D, lambda, v, x);
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

/* tengrad_get_blas_info: NULL and a short size refused with nothing written; fields filled and
   consistent (NUL-terminated strings, ISA codes in range, the fallback flag = its definition);
   a longer struct of a later header is accepted and its tail left alone. */
static void test_blas_info(void) {
    tengrad_blas_info info;
    CHECK_STATUS(tengrad_get_blas_info(NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    memset(&info, 0x5a, sizeof info);
    info.size = sizeof info - 1;
    CHECK_STATUS(tengrad_get_blas_info(&info), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(info.size == sizeof info - 1 && info.threads == 0x5a5a5a5a);
    info.size = sizeof info;
    CHECK_STATUS(tengrad_get_blas_info(&info), TENGRAD_OK);
    CHECK(info.size == sizeof info);
    CHECK(strcmp(info.library, "OpenBLAS") == 0);
    CHECK(strcmp(info.build, "system") == 0 || strcmp(info.build, "scipy-openblas32") == 0);
    CHECK(strlen(info.version) > 0 && strlen(info.core) > 0 && strstr(info.config, info.version) != NULL);
    CHECK(memchr(info.cpu_model, 0, sizeof info.cpu_model) != NULL);
    CHECK(info.threads >= 1);
    CHECK(info.core_isa >= TENGRAD_ISA_UNKNOWN && info.core_isa <= TENGRAD_ISA_AVX512);
    CHECK(info.cpu_isa >= TENGRAD_ISA_UNKNOWN && info.cpu_isa <= TENGRAD_ISA_AVX512);
    CHECK(info.generic_fallback ==
          (info.core_isa != TENGRAD_ISA_UNKNOWN && info.core_isa < TENGRAD_ISA_AVX2 && info.cpu_isa >= TENGRAD_ISA_AVX2));
#if defined(__x86_64__)
    CHECK(info.cpu_isa >= TENGRAD_ISA_SSE && info.cpu_family > 0);
#endif
    struct {
        tengrad_blas_info info;
        char later[16];
    } longer;
    memset(&longer, 0x33, sizeof longer);
    longer.info.size = sizeof longer;
    CHECK_STATUS(tengrad_get_blas_info(&longer.info), TENGRAD_OK);
    CHECK(longer.info.size == sizeof(tengrad_blas_info) && longer.later[0] == 0x33 && longer.later[15] == 0x33);
    printf("BLAS: %s %s (%s), core %s; CPU %s (family %d model %d), ISA %d, kernels %d\n", info.library, info.version,
           info.build, info.core, info.cpu_model, (int)info.cpu_family, (int)info.cpu_model_number, (int)info.cpu_isa,
           (int)info.core_isa);
}

static void test_null_handle(void) {
    int32_t id = 0;
    double d = 0;
    int64_t n = 0;
    tengrad_conv2d_shape shape;
    tengrad_layer_stats stats;
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
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
    CHECK_STATUS(tengrad_set_snapshot_representation(NULL, 0, TENGRAD_SNAPSHOT_RAW), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_clear_updates(NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_per_sample_gradients(NULL, 0, M, act, grads, 1, vw), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_from_gradients(NULL, 0, M, vw), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_token_mode(NULL, 0, TENGRAD_TOKENS_PER_TOKEN), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_get_token_mode(NULL, 0, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_tokens(NULL, 0, M, 1, act, grads, NULL, 1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_natural_gradient_tokens(NULL, 0, M, 1, act, grads, NULL, 1, vw, vb), TENGRAD_ERROR_INVALID_ARGUMENT);
}

static int same(const float *x, const float *y, int n) { return memcmp(x, y, sizeof(float) * (size_t)n) == 0; }

/* Sequence calls: tokens = 1 equals the plain call bitwise, a mask of ones equals no mask, per-token
   mode equals the plain call on the flattened tokens; bad tokens, masks and modes are refused with
   the state unchanged. M = 5 samples are read as 1 sequence of 5 tokens or 5 of 1. */
static void test_sequences(void) {
    tengrad_preconditioner *p = NULL;
    int32_t l = -1, c = -1, mode = -1;
    static float w1[OUT * IN], b1[OUT], w2[OUT * IN], b2[OUT];
    uint8_t ones[M], bad[M], zeros[M];
    for (int i = 0; i < M; i++) { ones[i] = 1; bad[i] = (uint8_t)(i == 2 ? 2 : 1); zeros[i] = 0; }
    CHECK_STATUS(tengrad_create(&p), TENGRAD_OK);
    CHECK_STATUS(tengrad_add_linear(p, IN, OUT, 1, &l), TENGRAD_OK);
    tengrad_conv2d_shape cs = TENGRAD_CONV2D_SHAPE_INIT;
    cs.in_channels = 1; cs.out_channels = 1; cs.in_height = 2; cs.in_width = 2; cs.kernel_height = 1; cs.kernel_width = 1;
    cs.stride_height = 1; cs.stride_width = 1; cs.dilation_height = 1; cs.dilation_width = 1; cs.groups = 1;
    CHECK_STATUS(tengrad_add_conv2d(p, &cs, &c), TENGRAD_OK);
    CHECK_STATUS(tengrad_natural_gradient(p, l, M, act, grads, (float)M, w1, b1), TENGRAD_OK);
    CHECK_STATUS(tengrad_natural_gradient_tokens(p, l, M, 1, act, grads, NULL, (float)M, w2, b2), TENGRAD_OK);
    CHECK(same(w1, w2, OUT * IN) && same(b1, b2, OUT));
    CHECK_STATUS(tengrad_natural_gradient_tokens(p, l, 1, M, act, grads, NULL, 1.0f, w1, b1), TENGRAD_OK);
    CHECK_STATUS(tengrad_natural_gradient_tokens(p, l, 1, M, act, grads, ones, 1.0f, w2, b2), TENGRAD_OK);
    CHECK(same(w1, w2, OUT * IN) && same(b1, b2, OUT));
    CHECK_STATUS(tengrad_get_token_mode(p, l, &mode), TENGRAD_OK);
    CHECK(mode == TENGRAD_TOKENS_PER_SEQUENCE);
    CHECK_STATUS(tengrad_set_token_mode(p, l, TENGRAD_TOKENS_PER_TOKEN), TENGRAD_OK);
    CHECK_STATUS(tengrad_natural_gradient_tokens(p, l, 1, M, act, grads, NULL, 2.0f, w1, b1), TENGRAD_OK);
    CHECK_STATUS(tengrad_natural_gradient(p, l, M, act, grads, 2.0f, w2, b2), TENGRAD_OK);
    CHECK(same(w1, w2, OUT * IN) && same(b1, b2, OUT));
    CHECK_STATUS(tengrad_update_curvature_tokens(p, l, 1, M, act, grads, zeros, 1.0f), TENGRAD_ERROR_INVALID_ARGUMENT);
    size_t n = 0;
    CHECK_STATUS(tengrad_save_state(p, NULL, 0, &n), TENGRAD_OK);
    static unsigned char before[1 << 14], after[1 << 14];
    CHECK(n <= sizeof before);
    CHECK_STATUS(tengrad_save_state(p, before, sizeof before, &n), TENGRAD_OK);
    CHECK_STATUS(tengrad_set_token_mode(p, l, 7), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_token_mode(p, c, TENGRAD_TOKENS_PER_TOKEN), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_tokens(p, l, 1, 0, act, grads, NULL, 1.0f), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_tokens(p, l, 1, -2, act, grads, NULL, 1.0f), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_tokens(p, l, 1, M, act, grads, bad, 1.0f), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_tokens(p, l, 1, INT64_MAX / 2, act, grads, NULL, 1.0f), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_update_curvature_tokens(p, c, 1, 2, act, grads, NULL, 1.0f), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_natural_gradient_tokens(p, l, 1, M, act, grads, NULL, 1.0f, NULL, b1), TENGRAD_ERROR_INVALID_ARGUMENT);
    size_t n2 = 0;
    CHECK_STATUS(tengrad_save_state(p, after, sizeof after, &n2), TENGRAD_OK);
    CHECK(n2 == n && memcmp(before, after, n) == 0);
    tengrad_destroy(p);
}

/* Per-sample gradient rows: computed on one handle, gathered in two pieces and installed on
   another, they precondition like tengrad_update_curvature on the whole batch; bad rows, sizes,
   pointers and aliasing are refused with the state unchanged. */
static void test_per_sample_rows(void) {
    tengrad_preconditioner *worker = NULL, *owner = NULL, *direct = NULL;
    int32_t a = -1, b = -1, c = -1;
    static float rows[M * D], w1[OUT * IN], b1[OUT], w2[OUT * IN], b2[OUT];
    CHECK_STATUS(tengrad_create(&worker), TENGRAD_OK);
    CHECK_STATUS(tengrad_create(&owner), TENGRAD_OK);
    CHECK_STATUS(tengrad_create(&direct), TENGRAD_OK);
    CHECK_STATUS(tengrad_add_linear(worker, IN, OUT, 1, &a), TENGRAD_OK);
    CHECK_STATUS(tengrad_add_linear(owner, IN, OUT, 1, &b), TENGRAD_OK);
    CHECK_STATUS(tengrad_add_linear(direct, IN, OUT, 1, &c), TENGRAD_OK);
    /* rows of samples 0..1 and 2..M-1 from two calls, as two workers would send them */
    CHECK_STATUS(tengrad_per_sample_gradients(worker, a, 2, act, grads, (float)M, rows), TENGRAD_OK);
    CHECK_STATUS(tengrad_per_sample_gradients(worker, a, M - 2, act + 2 * IN, grads + 2 * OUT, (float)M, rows + 2 * D),
                 TENGRAD_OK);
    CHECK_STATUS(tengrad_update_curvature_from_gradients(owner, b, M, rows), TENGRAD_OK);
    CHECK_STATUS(tengrad_update_curvature(direct, c, M, act, grads, (float)M), TENGRAD_OK);
    CHECK_STATUS(tengrad_precondition(owner, b, vw, vb, w1, b1), TENGRAD_OK);
    CHECK_STATUS(tengrad_precondition(direct, c, vw, vb, w2, b2), TENGRAD_OK);
    double num = 0, den = 0;
    for (int i = 0; i < OUT * IN; i++) { num += (w1[i] - w2[i]) * (w1[i] - w2[i]); den += w2[i] * w2[i]; }
    for (int i = 0; i < OUT; i++) { num += (b1[i] - b2[i]) * (b1[i] - b2[i]); den += b2[i] * b2[i]; }
    CHECK(den > 0 && sqrt(num / den) < 1e-5);
    tengrad_snapshot_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    CHECK_STATUS(tengrad_get_snapshot_info(owner, b, &info), TENGRAD_OK);
    CHECK(info.representation == TENGRAD_SNAPSHOT_PER_SAMPLE);

    /* refusals, each leaving the owner's snapshot as it was */
    float saved = rows[7];
    rows[7] = NAN;
    CHECK_STATUS(tengrad_update_curvature_from_gradients(owner, b, M, rows), TENGRAD_ERROR_NOT_FINITE);
    rows[7] = saved;
    CHECK_STATUS(tengrad_update_curvature_from_gradients(owner, b, M, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_from_gradients(owner, b, 0, rows), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_from_gradients(owner, b, -3, rows), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_from_gradients(owner, 5, M, rows), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature_from_gradients(owner, b, INT64_MAX / 2, rows), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_per_sample_gradients(worker, a, M, act, grads, 0.0f, rows), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_per_sample_gradients(worker, a, M, act, grads, 1.0f, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_per_sample_gradients(worker, a, M, act, grads, 1.0f, act), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_precondition(owner, b, vw, vb, w1, b1), TENGRAD_OK);
    num = 0;
    for (int i = 0; i < OUT * IN; i++) num += (w1[i] - w2[i]) * (w1[i] - w2[i]);
    CHECK(sqrt(num / den) < 1e-5);
    tengrad_destroy(worker);
    tengrad_destroy(owner);
    tengrad_destroy(direct);
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
    int32_t threads = -1;
    CHECK_STATUS(tengrad_get_blas_threads(p, &threads), TENGRAD_OK);
    CHECK(threads == 0);
    CHECK_STATUS(tengrad_set_blas_threads(p, -1), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_blas_threads(p, 1025), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_blas_threads(p, 1), TENGRAD_OK);
    CHECK_STATUS(tengrad_get_blas_threads(p, &threads), TENGRAD_OK);
    CHECK(threads == 1);
    CHECK_STATUS(tengrad_get_blas_threads(p, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_blas_threads(p, 0), TENGRAD_OK);
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
    /* one huge side (found by the fuzzer: in_features + 1 overflowed without a bias) */
    CHECK_STATUS(tengrad_add_linear(p, INT64_MAX, 1, 0, &id), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_add_linear(p, INT64_MAX, 1, 1, &id), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_add_linear(p, 1, INT64_MAX, 0, &id), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_add_linear(p, INT64_MAX - 1, 1, 0, &id), TENGRAD_ERROR_SHAPE);
    CHECK_STATUS(tengrad_add_linear(p, (int64_t)1 << 40, 1, 0, &id), TENGRAD_ERROR_SHAPE);
    CHECK(id == -7); /* out-parameters untouched on failure */
    tengrad_conv2d_shape shape;
    memset(&shape, 0, sizeof shape);
    shape.size = sizeof shape;
    CHECK_STATUS(tengrad_add_conv2d(p, NULL, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_add_conv2d(p, &shape, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "in_channels") != NULL);
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
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
    CHECK_STATUS(tengrad_get_layer_stats(p, 1, &stats), TENGRAD_OK);
    CHECK(stats.kind == TENGRAD_LAYER_LINEAR && stats.parameters == 10 && stats.batch == 0);
    CHECK_STATUS(tengrad_get_layer_stats(p, 2, &stats), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_get_layer_stats(p, -1, &stats), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_conv_strategy(p, 0, TENGRAD_CONV_EXPLICIT), TENGRAD_OK); /* linear: for tokens */
    CHECK_STATUS(tengrad_set_conv_strategy(p, 0, TENGRAD_CONV_AUTO), TENGRAD_OK);
    int64_t usage = -1;
    CHECK_STATUS(tengrad_get_memory_usage(p, &usage), TENGRAD_OK);
    CHECK(usage == 0); /* no snapshot yet */
    CHECK_STATUS(tengrad_get_memory_usage(p, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    tengrad_destroy(p);
}

static tengrad_conv2d_shape conv_shape(int64_t cin, int64_t cout, int64_t hw, int64_t k, int64_t stride, int64_t pad,
                                       int64_t dil, int64_t groups, int32_t bias) {
    tengrad_conv2d_shape s = TENGRAD_CONV2D_SHAPE_INIT;
    s.in_channels = cin;
    s.out_channels = cout;
    s.in_height = s.in_width = hw;
    s.kernel_height = s.kernel_width = k;
    s.stride_height = s.stride_width = stride;
    s.padding_height = s.padding_width = pad;
    s.dilation_height = s.dilation_width = dil;
    s.groups = groups;
    s.has_bias = bias;
    return s;
}

static void test_conv2d(void) {
    tengrad_preconditioner *p = NULL;
    int32_t id = -1;
    CHECK_STATUS(tengrad_create(&p), TENGRAD_OK);
    /* Invalid geometry, each rejected with a message naming the field. */
    tengrad_conv2d_shape bad = conv_shape(3, 4, 8, 3, 1, 1, 1, 2, 1);
    CHECK_STATUS(tengrad_add_conv2d(p, &bad, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "in_channels") != NULL);
    bad = conv_shape(2, 2, 4, 7, 1, 1, 1, 1, 1);
    CHECK_STATUS(tengrad_add_conv2d(p, &bad, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "kernel_height") != NULL);
    bad = conv_shape(2, 2, 8, 3, 0, 1, 1, 1, 1);
    CHECK_STATUS(tengrad_add_conv2d(p, &bad, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK(strstr(tengrad_last_error(p), "stride_height") != NULL);
    bad = conv_shape(2, 2, 8, 3, 1, -1, 1, 1, 1);
    CHECK_STATUS(tengrad_add_conv2d(p, &bad, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    bad = conv_shape(2, 2, 8, 3, 1, 1, 1, 1, 3);
    CHECK_STATUS(tengrad_add_conv2d(p, &bad, &id), TENGRAD_ERROR_INVALID_ARGUMENT);
    bad = conv_shape(INT64_MAX / 2, INT64_MAX / 2, 8, 3, 1, 1, 1, 1, 1);
    CHECK_STATUS(tengrad_add_conv2d(p, &bad, &id), TENGRAD_ERROR_SHAPE);
    CHECK(id == -1);

    /* Grouped, strided, dilated, padded, with bias: m = 3, C_in 4 → C_out 6, 7×7, k 3, stride 2,
       pad 1, dilation 2, groups 2 → H_out = W_out = 3. Both strategies must agree. */
    enum { CM = 3, CIN = 4, COUT = 6, HW = 7, HO = 3, WSZ = COUT * (CIN / 2) * 9 };
    tengrad_conv2d_shape good = conv_shape(CIN, COUT, HW, 3, 2, 1, 2, 2, 1);
    int32_t a = -1, b = -1;
    CHECK_STATUS(tengrad_add_conv2d(p, &good, &a), TENGRAD_OK);
    CHECK_STATUS(tengrad_add_conv2d(p, &good, &b), TENGRAD_OK);
    CHECK(a == 0 && b == 1);
    CHECK_STATUS(tengrad_set_conv_strategy(p, a, TENGRAD_CONV_FACTORED), TENGRAD_OK);
    CHECK_STATUS(tengrad_set_conv_strategy(p, b, TENGRAD_CONV_EXPLICIT), TENGRAD_OK);
    CHECK_STATUS(tengrad_set_conv_strategy(p, b, 7), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_conv_strategy(p, 9, TENGRAD_CONV_AUTO), TENGRAD_ERROR_INVALID_ARGUMENT);
    static float x[CM * CIN * HW * HW], g[CM * COUT * HO * HO], wa[WSZ], wb[WSZ], ba[COUT], bb[COUT];
    fill(x, CM * CIN * HW * HW, 5);
    fill(g, CM * COUT * HO * HO, 6);
    CHECK_STATUS(tengrad_natural_gradient(p, a, CM, x, g, 1, wa, ba), TENGRAD_OK);
    CHECK_STATUS(tengrad_natural_gradient(p, b, CM, x, g, 1, wb, bb), TENGRAD_OK);
    double num = 0, den = 0;
    for (int i = 0; i < WSZ; i++) { num += (wa[i] - wb[i]) * (wa[i] - wb[i]); den += wb[i] * wb[i]; }
    for (int i = 0; i < COUT; i++) { num += (ba[i] - bb[i]) * (ba[i] - bb[i]); den += bb[i] * bb[i]; }
    CHECK(den > 0 && sqrt(num / den) < 1e-5);
    tengrad_layer_stats sa, sb;
    memset(&sa, 0, sizeof sa);
    sa.size = sb.size = sizeof sa;
    CHECK_STATUS(tengrad_get_layer_stats(p, a, &sa), TENGRAD_OK);
    CHECK_STATUS(tengrad_get_layer_stats(p, b, &sb), TENGRAD_OK);
    CHECK(sa.kind == TENGRAD_LAYER_CONV2D && sa.conv_strategy == TENGRAD_CONV_FACTORED);
    CHECK(sb.conv_strategy == TENGRAD_CONV_EXPLICIT && sb.parameters == WSZ + COUT);
    CHECK(sa.conv_factored_flops > 0 && sa.conv_explicit_flops > 0);
    CHECK(sa.snapshot_bytes >= (int64_t)sizeof x + (int64_t)sizeof g);

    /* Snapshot representations: raw on a, per-sample on b; the reuse path must agree. */
    CHECK_STATUS(tengrad_set_snapshot_representation(p, a, TENGRAD_SNAPSHOT_RAW), TENGRAD_OK);
    CHECK_STATUS(tengrad_set_snapshot_representation(p, b, TENGRAD_SNAPSHOT_PER_SAMPLE), TENGRAD_OK);
    CHECK_STATUS(tengrad_set_snapshot_representation(p, b, 3), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_set_snapshot_representation(p, 9, TENGRAD_SNAPSHOT_RAW), TENGRAD_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(tengrad_update_curvature(p, a, CM, x, g, 1), TENGRAD_OK);
    CHECK_STATUS(tengrad_update_curvature(p, b, CM, x, g, 1), TENGRAD_OK);
    static float va[WSZ], vba[COUT];
    fill(va, WSZ, 7);
    fill(vba, COUT, 8);
    CHECK_STATUS(tengrad_precondition(p, a, va, vba, wa, ba), TENGRAD_OK);
    CHECK_STATUS(tengrad_precondition(p, b, va, vba, wb, bb), TENGRAD_OK);
    num = den = 0;
    for (int i = 0; i < WSZ; i++) { num += (wa[i] - wb[i]) * (wa[i] - wb[i]); den += wb[i] * wb[i]; }
    for (int i = 0; i < COUT; i++) { num += (ba[i] - bb[i]) * (ba[i] - bb[i]); den += bb[i] * bb[i]; }
    CHECK(den > 0 && sqrt(num / den) < 1e-5);
    tengrad_snapshot_info ia, ib;
    memset(&ia, 0, sizeof ia);
    CHECK_STATUS(tengrad_get_snapshot_info(p, a, &ia), TENGRAD_ERROR_INVALID_ARGUMENT); /* size not set */
    CHECK(strstr(tengrad_last_error(p), "size") != NULL);
    CHECK_STATUS(tengrad_get_snapshot_info(p, a, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    ia.size = sizeof ia;
    ib.size = sizeof ib;
    CHECK_STATUS(tengrad_get_snapshot_info(p, a, &ia), TENGRAD_OK);
    CHECK_STATUS(tengrad_get_snapshot_info(p, b, &ib), TENGRAD_OK);
    CHECK(ia.size == sizeof ia && ia.representation == TENGRAD_SNAPSHOT_RAW && ia.representation_setting == TENGRAD_SNAPSHOT_RAW);
    CHECK(ia.batch == CM && ia.representation_bytes == (int64_t)(sizeof x + sizeof g));
    CHECK(ib.representation == TENGRAD_SNAPSHOT_PER_SAMPLE && ib.representation_bytes == 4 * CM * (WSZ + COUT));
    CHECK(ib.snapshot_bytes == ib.representation_bytes + 2 * 8 * CM * CM);
    CHECK(ib.raw_reuse_cost > 0 && ib.per_sample_reuse_cost > 0 && ib.per_sample_bytes == 4.0 * CM * (WSZ + COUT));
    /* A later, longer version of the struct: the library fills its own prefix and nothing more. */
    struct { tengrad_snapshot_info info; double future; } longer;
    memset(&longer, 0, sizeof longer);
    longer.info.size = sizeof longer;
    longer.future = 42;
    CHECK_STATUS(tengrad_get_snapshot_info(p, b, &longer.info), TENGRAD_OK);
    CHECK(longer.future == 42 && longer.info.representation == TENGRAD_SNAPSHOT_PER_SAMPLE);
    /* Bias pointers must match the layer; NaN output gradients are rejected. */
    CHECK_STATUS(tengrad_natural_gradient(p, a, CM, x, g, 1, wa, NULL), TENGRAD_ERROR_INVALID_ARGUMENT);
    g[4] = NAN;
    CHECK_STATUS(tengrad_update_curvature(p, a, CM, x, g, 1), TENGRAD_ERROR_NOT_FINITE);
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

    /* One-call natural gradient against the oracle (tolerance: the 1e-3 bound of docs/DESIGN.md). */
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
    memset(&stats, 0, sizeof stats);
    stats.size = sizeof stats;
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
    test_blas_info();
    test_null_handle();
    test_settings_and_layers();
    test_numerics_and_errors();
    test_conv2d();
    test_per_sample_rows();
    test_sequences();
    return report();
}
