/*
 * Leak check (run under LeakSanitizer by `make test-asan`): many create / use / fail / save /
 * load / destroy cycles. Any allocation the library keeps after tengrad_destroy is reported.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include "tengrad.h"

int main(void) {
    static float a[8 * 20], g[8 * 6], w[6 * 20], b[6], x[8 * 2 * 6 * 6], gy[8 * 4 * 6 * 6], cw[4 * 2 * 9], cb[4];
    for (int i = 0; i < 8 * 20; i++) a[i] = (float)((i * 37) % 11) / 7.0f - 0.7f;
    for (int i = 0; i < 8 * 6; i++) g[i] = (float)((i * 13) % 5) / 3.0f - 0.6f;
    for (int i = 0; i < 8 * 2 * 36; i++) x[i] = (float)((i * 7) % 13) / 6.0f - 1.0f;
    for (int i = 0; i < 8 * 4 * 36; i++) gy[i] = (float)((i * 11) % 9) / 4.0f - 1.0f;
    const tengrad_conv2d_shape shape = {sizeof(tengrad_conv2d_shape), 2, 4, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1};
    int failures = 0;
    for (int round = 0; round < 200; round++) {
        tengrad_preconditioner *p = NULL, *q = NULL;
        int32_t fc = -1, conv = -1;
        failures += tengrad_create(&p) != TENGRAD_OK;
        failures += tengrad_add_linear(p, 20, 6, 1, &fc) != TENGRAD_OK;
        failures += tengrad_add_conv2d(p, &shape, &conv) != TENGRAD_OK;
        failures += tengrad_natural_gradient(p, fc, 8, a, g, 8, w, b) != TENGRAD_OK;
        failures += tengrad_update_curvature(p, conv, 8, x, gy, 8) != TENGRAD_OK;
        failures += tengrad_precondition(p, conv, cw, cb, cw, cb) != TENGRAD_OK;
        a[round % 160] = NAN; /* a failing call must free what it allocated */
        failures += tengrad_update_curvature(p, fc, 8, a, g, 8) != TENGRAD_ERROR_NOT_FINITE;
        a[round % 160] = 0.5f;
        failures += tengrad_set_memory_limit(p, 1) != TENGRAD_OK;
        failures += tengrad_update_curvature(p, conv, 8, x, gy, 8) != TENGRAD_ERROR_OUT_OF_MEMORY;
        failures += tengrad_set_memory_limit(p, 0) != TENGRAD_OK;
        size_t n = 0;
        failures += tengrad_save_state(p, NULL, 0, &n) != TENGRAD_OK;
        unsigned char *blob = (unsigned char *)malloc(n);
        failures += tengrad_save_state(p, blob, n, &n) != TENGRAD_OK;
        failures += tengrad_create(&q) != TENGRAD_OK;
        failures += tengrad_load_state(q, blob, n) != TENGRAD_OK;
        blob[n / 2] ^= 1;
        failures += tengrad_load_state(q, blob, n) != TENGRAD_ERROR_CORRUPT;
        free(blob);
        tengrad_destroy(q);
        tengrad_destroy(p);
    }
    printf("leak loop: 200 rounds, %d unexpected statuses\n", failures);
    return failures == 0 ? 0 : 1;
}
