/* Private to Sources/CKernels (not in include/: not part of the Swift module): what the AVX2
   kernels of kernels.c and passes.c share. x86-64 only; callers check the CPU first. */
#ifndef TENGRAD_CKERNELS_AVX2_H
#define TENGRAD_CKERNELS_AVX2_H
#include <immintrin.h>
#include <stdint.h>

#define AVX2 __attribute__((target("avx2,fma")))

/* Eight rows of eight floats (row stride ld) transposed in registers: r[k] becomes column k. */
AVX2 static inline void transpose8x8(const float *a, int64_t ld, __m256 r[8]) {
    __m256 t[8], s[8];
    for (int k = 0; k < 8; k++) r[k] = _mm256_loadu_ps(a + k * ld);
    for (int k = 0; k < 8; k += 2) {
        t[k] = _mm256_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm256_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 8; k += 4) {
        s[k] = _mm256_shuffle_ps(t[k], t[k + 2], 0x44);
        s[k + 1] = _mm256_shuffle_ps(t[k], t[k + 2], 0xEE);
        s[k + 2] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0x44);
        s[k + 3] = _mm256_shuffle_ps(t[k + 1], t[k + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x20);
        r[k + 4] = _mm256_permute2f128_ps(s[k], s[k + 4], 0x31);
    }
}

#endif
