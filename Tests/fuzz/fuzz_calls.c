/*
 * libFuzzer harness: arbitrary sequences of C ABI calls with arbitrary sizes, layer ids, damping
 * values, flags and float bit patterns. The library must never crash, leak or touch memory it
 * was not given; every call must return a defined status. Data arrays are always sized to what
 * the call may read (the harness asks the library for the layer's shape), so any out-of-bounds
 * access ASan reports is the library's.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tengrad.h"

typedef struct {
    const uint8_t *data;
    size_t size, at;
} input;

static uint8_t u8(input *in) { return in->at < in->size ? in->data[in->at++] : 0; }
static uint64_t u64(input *in) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)u8(in) << (8 * i);
    return v;
}
static double f64(input *in) { uint64_t b = u64(in); double d; memcpy(&d, &b, 8); return d; }
static float f32(input *in) { uint32_t b = (uint32_t)u64(in); float f; memcpy(&f, &b, 4); return f; }
/* Mostly small sizes, sometimes any 64-bit value (overflow, negative). */
static int64_t size_value(input *in) { uint8_t k = u8(in); return k < 240 ? (int64_t)(k % 9) : (int64_t)u64(in); }

enum { MAX_FLOATS = 1 << 16 };
static float pool[MAX_FLOATS], out_w[MAX_FLOATS], out_b[4096], rows[MAX_FLOATS];
static uint8_t mask_buf[4096];

/* Fills the pool with a mix of ordinary values and raw bit patterns (NaN, Inf, huge, tiny); mode
   bit 2: small non-negative integers (token ids an embedding takes, mostly). */
static void fill_pool(input *in, size_t n) {
    uint8_t mode = u8(in);
    for (size_t i = 0; i < n; i++) {
        if (mode & 2) pool[i] = (float)(i * 2654435761u % 5);
        else if (mode & 1) pool[i] = (float)((int)(i * 2654435761u % 2001) - 1000) / 500.0f;
        else pool[i] = (float)((int)(i * 40503u % 201) - 100) / 100.0f;
    }
    for (int k = 0; k < (mode >> 4); k++) pool[u8(in) * 97 % n] = f32(in);
}

/* Numbers in an array of `rank` dims; -1 above 4096 in any dim (too big to fuzz, and no overflow). */
static int64_t product(const int64_t *dims, int32_t rank) {
    int64_t n = 1;
    for (int32_t i = 0; i < rank; i++) {
        if (dims[i] < 0 || dims[i] > 4096) return -1;
        n *= dims[i];
    }
    return n;
}

/* Element counts of a layer's arrays, as the library sizes them (tengrad_get_layer_arrays: no
   copy of a conv's output-size formula here); 0 when the layer is unknown or too big to fuzz. */
static void layer_sizes(tengrad_preconditioner *p, int32_t layer, int64_t batch, size_t *acts, size_t *grads,
                        size_t *weight, size_t *bias) {
    tengrad_layer_arrays arr;
    memset(&arr, 0, sizeof arr);
    arr.size = sizeof arr;
    *acts = *grads = *weight = *bias = 0;
    if (batch <= 0 || batch > 16 || tengrad_get_layer_arrays(p, layer, &arr) != TENGRAD_OK) return;
    int64_t a = product(arr.activation_dims, arr.activation_rank), g = product(arr.output_grad_dims, arr.output_grad_rank);
    int64_t w = product(arr.weight_dims, arr.weight_rank), b = arr.bias_rank ? product(arr.bias_dims, arr.bias_rank) : 0;
    if (a < 0 || g < 0 || w < 0 || b < 0 || a > 4096 || g > 4096) return;
    *acts = (size_t)(batch * a);
    *grads = (size_t)(batch * g);
    *weight = (size_t)w;
    *bias = (size_t)b;
    if (*acts + *grads > MAX_FLOATS || *weight > MAX_FLOATS) *acts = *grads = *weight = *bias = 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    input in = {data, size, 0};
    tengrad_preconditioner *p = NULL;
    if (tengrad_create(&p) != TENGRAD_OK) abort();
    for (int step = 0; step < 24 && in.at < in.size; step++) {
        uint8_t op = u8(&in) % 16;
        int32_t id = 0, layer = (int32_t)(u8(&in) % 5) - 1;
        int64_t batch = size_value(&in);
        size_t acts, grads, weight, bias;
        switch (op) {
        case 0: {
            int64_t a = size_value(&in), b = size_value(&in);
            uint8_t flags = u8(&in);  /* has_bias 0..2 (2 refused); 0x80: affine, 0x40: embedding (a ids, b wide) */
            if (flags & 0x80) (void)tengrad_add_affine(p, a, (int32_t)(flags % 3), &id);
            else if (flags & 0x40) (void)tengrad_add_embedding(p, a, b, &id);
            else (void)tengrad_add_linear(p, a, b, (int32_t)(flags % 3), &id);
            break;
        }
        case 1: {
            tengrad_conv2d_shape s = TENGRAD_CONV2D_SHAPE_INIT;
            int64_t *f = &s.in_channels;
            for (int k = 0; k < 13; k++) f[k] = size_value(&in);
            s.has_bias = (int32_t)(u8(&in) % 3);
            if (u8(&in) % 8 == 0) s.size = u8(&in) % (sizeof s + 1);  /* a wrong size now and then */
            (void)tengrad_add_conv2d(p, &s, &id);
            break;
        }
        case 2: (void)tengrad_set_damping(p, f64(&in)); break;
        case 3: (void)tengrad_set_memory_limit(p, (int64_t)u64(&in) % (1 << 22)); break;
        case 4: {
            uint8_t v = u8(&in);
            if (v & 1) (void)tengrad_set_conv_strategy(p, layer, (int32_t)((v >> 1) % 4));
            else if (v & 2) (void)tengrad_set_snapshot_representation(p, layer, (int32_t)((v >> 2) % 4));
            else if (v & 4) { /* any key, any value, and the getter */
                int64_t value = (int64_t)u64(&in);
                (void)tengrad_set_layer_param(p, layer, (int32_t)(v >> 3) % 6, v & 8 ? value : value % 4);
                (void)tengrad_get_layer_param(p, layer, (int32_t)(v >> 3) % 6, &value);
            }
            else (void)tengrad_set_blas_threads(p, (int32_t)(v >> 2) % 4 - 1); /* -1 (refused) to 2 */
            break;
        }
        case 5:
        case 6:
        case 7:
            layer_sizes(p, layer, batch, &acts, &grads, &weight, &bias);
            fill_pool(&in, acts + grads > 0 ? acts + grads : 1);
            if (acts == 0) { /* unknown or big layer: only calls the library must refuse unread */
                (void)tengrad_update_curvature(p, layer, batch, NULL, pool, 1.0f);
                break;
            }
            if (op == 5) (void)tengrad_update_curvature(p, layer, batch, pool, pool + acts, f32(&in));
            else if (op == 6) (void)tengrad_natural_gradient(p, layer, batch, pool, pool + acts, (float)(u8(&in) + 1), out_w, bias ? out_b : NULL);
            else {
                memcpy(out_w, pool, sizeof(float) * (weight < acts + grads ? weight : acts + grads));
                (void)tengrad_precondition(p, layer, out_w, bias ? out_b : NULL, out_w, bias ? out_b : NULL);
            }
            break;
        case 8: {
            double nu;
            (void)tengrad_kl_clip_factor(p, f64(&in), f64(&in), &nu);
            tengrad_layer_stats st;
            st.size = u8(&in) & 1 ? sizeof st : (size_t)u8(&in);
            (void)tengrad_get_layer_stats(p, layer, &st);
            tengrad_layer_arrays arr;
            arr.size = u8(&in) & 1 ? sizeof arr : (size_t)u8(&in);
            (void)tengrad_get_layer_arrays(p, layer, &arr);
            tengrad_snapshot_info info;
            info.size = u8(&in) & 1 ? sizeof info : (size_t)u8(&in);
            (void)tengrad_get_snapshot_info(p, layer, &info);
            break;
        }
        case 9: { /* save, then load into a fresh handle and into this one */
            size_t n = 0;
            if (tengrad_save_state(p, NULL, 0, &n) != TENGRAD_OK || n > (1 << 24)) break;
            void *blob = malloc(n);
            if (blob && tengrad_save_state(p, blob, n, &n) == TENGRAD_OK) {
                tengrad_preconditioner *q = NULL;
                if (tengrad_create(&q) == TENGRAD_OK) {
                    tengrad_status st = tengrad_load_state(q, blob, n);
                    if (st != TENGRAD_OK) { /* its own state must load into a fresh handle */
                        fprintf(stderr, "reload failed: %s\n", tengrad_last_error(q));
                        abort();
                    }
                    tengrad_destroy(q);
                }
                /* Into p itself: also fine, unless p's memory limit cannot hold old and new
                   snapshots at once (documented), which must then leave p unchanged. */
                tengrad_status st = tengrad_load_state(p, blob, n);
                if (st != TENGRAD_OK && st != TENGRAD_ERROR_OUT_OF_MEMORY) abort();
            }
            free(blob);
            break;
        }
        case 10: { /* per-sample rows: from a batch, maybe corrupted, into a snapshot */
            layer_sizes(p, layer, batch, &acts, &grads, &weight, &bias);
            size_t n = (size_t)(batch > 0 ? batch : 1) * (weight + bias);
            fill_pool(&in, acts + grads > 0 ? acts + grads : 1);
            if (acts == 0 || n > MAX_FLOATS) {
                (void)tengrad_update_curvature_from_gradients(p, layer, batch, NULL);
                break;
            }
            if (tengrad_per_sample_gradients(p, layer, batch, pool, pool + acts, f32(&in), rows) != TENGRAD_OK) break;
            uint8_t v = u8(&in);
            if (v & 1) rows[u8(&in) * 31 % n] = f32(&in);
            (void)tengrad_update_curvature_from_gradients(p, layer, v & 2 ? batch - 1 : batch, rows);
            break;
        }
        case 11: { /* sequences: tokens, a fuzzed mask, token mode */
            int64_t tokens = (int64_t)(u8(&in) % 6) - 1;  /* -1 .. 4 */
            uint8_t v = u8(&in);
            if (v & 1) (void)tengrad_set_token_mode(p, layer, (int32_t)(v >> 1) % 3);
            layer_sizes(p, layer, batch, &acts, &grads, &weight, &bias);
            size_t t = tokens > 0 ? (size_t)tokens : 1;
            if (acts == 0 || (acts + grads) * t > MAX_FLOATS || (size_t)batch * t > sizeof mask_buf) {
                (void)tengrad_update_curvature_tokens(p, layer, batch, tokens, NULL, pool, NULL, 1.0f);
                break;
            }
            fill_pool(&in, (acts + grads) * t);
            for (size_t i = 0; i < (size_t)batch * t; i++) mask_buf[i] = (uint8_t)(u8(&in) % (v & 2 ? 3 : 2));
            const uint8_t *mask = v & 4 ? mask_buf : NULL;
            if ((v & 16) && (size_t)batch * (weight + bias) <= MAX_FLOATS) {
                if (tengrad_per_sample_gradients_tokens(p, layer, batch, tokens, pool, pool + acts * t, mask, f32(&in), rows)
                    == TENGRAD_OK)
                    (void)tengrad_update_curvature_from_gradients(p, layer, batch, rows);
            } else if (v & 8) (void)tengrad_update_curvature_tokens(p, layer, batch, tokens, pool, pool + acts * t, mask, f32(&in));
            else (void)tengrad_natural_gradient_tokens(p, layer, batch, tokens, pool, pool + acts * t, mask, 1.0f, out_w, bias ? out_b : NULL);
            break;
        }
        case 12: { /* the batch descriptor with a fuzzed size and an unknown trailing field */
            struct { tengrad_batch b; int64_t newer; } d;
            memset(&d, 0, sizeof d);
            uint8_t v = u8(&in);
            layer_sizes(p, layer, batch, &acts, &grads, &weight, &bias);
            fill_pool(&in, acts + grads > 0 ? acts + grads : 1);
            /* never more than the bytes really there (a caller's lie is its own bug), or > 1 KiB (refused unread) */
            d.b.size = v & 1 ? sizeof d.b : v & 2 ? sizeof d : v & 4 ? u8(&in) % (sizeof d + 1) : (size_t)u8(&in) * 4096u;
            d.newer = v & 8 ? (int64_t)u8(&in) : 0;
            d.b.batch = batch;
            d.b.tokens = 1;
            d.b.activations = acts ? pool : NULL;
            d.b.output_grads = pool + acts;
            d.b.grad_scale = f64(&in);
            if (v & 16) (void)tengrad_update_curvature_v2(p, layer, &d.b);
            else (void)tengrad_natural_gradient_v2(p, layer, &d.b, out_w, bias ? out_b : NULL);
            break;
        }
        case 13: { /* a diagonal base from the pool (fuzzed values: 0, negative, NaN, subnormal), or cleared */
            uint8_t v = u8(&in);
            layer_sizes(p, layer, 1, &acts, &grads, &weight, &bias);
            if (weight == 0 || weight + bias > MAX_FLOATS) {
                (void)tengrad_set_layer_base(p, layer, NULL, NULL);
                break;
            }
            fill_pool(&in, weight + bias);
            if (v & 1) for (size_t i = 0; i < weight + bias; i++) pool[i] = pool[i] < 0 ? -pool[i] : pool[i] + 0.5f;
            if (v & 2) (void)tengrad_set_layer_base(p, layer, NULL, NULL);
            else (void)tengrad_set_layer_base(p, layer, pool, v & 4 ? NULL : pool + weight);
            int32_t has;
            (void)tengrad_get_layer_base(p, layer, &has);
            break;
        }
        case 14: { /* the precondition in two phases: a prepare or not, a finish with a fuzzed scale */
            uint8_t v = u8(&in);
            layer_sizes(p, layer, 1, &acts, &grads, &weight, &bias);
            if (weight == 0 || weight + bias > MAX_FLOATS || bias > 4096) {
                (void)tengrad_precondition_finish(p, layer, NULL, NULL, 1.0, out_w, NULL);  /* refused unread */
                break;
            }
            fill_pool(&in, weight + bias);
            memcpy(out_w, pool, sizeof(float) * weight);
            memcpy(out_b, pool + weight, sizeof(float) * bias);
            if (v & 1) (void)tengrad_precondition_prepare(p, layer, out_w, bias ? out_b : NULL);
            double scale = v & 2 ? f64(&in) : 1.0;
            if (v & 4)  /* in place */
                (void)tengrad_precondition_finish(p, layer, out_w, bias ? out_b : NULL, scale, out_w, bias ? out_b : NULL);
            else
                (void)tengrad_precondition_finish(p, layer, pool, bias ? pool + weight : NULL, scale, out_w,
                                                  bias ? out_b : NULL);
            break;
        }
        default: (void)tengrad_last_error(p); break;
        }
    }
    tengrad_destroy(p);
    return 0;
}
