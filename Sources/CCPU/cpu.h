/* CPU facts for tengrad_get_blas_info: the widest vector instruction set the CPU and the
   operating system both support, and the CPU's model. Header-only (cpuid and xgetbv), x86-64
   only; elsewhere the ISA is unknown (0) and the model empty. */
#ifndef TENGRAD_CCPU_H
#define TENGRAD_CCPU_H
#include <stdint.h>
#include <string.h>

enum {
    TENGRAD_CPU_ISA_UNKNOWN = 0,
    TENGRAD_CPU_ISA_SSE = 1, /* SSE2/SSE3 */
    TENGRAD_CPU_ISA_AVX = 2,
    TENGRAD_CPU_ISA_AVX2 = 3, /* with FMA */
    TENGRAD_CPU_ISA_AVX512 = 4 /* F, BW, DQ, VL (SkylakeX and later) */
};

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>

static inline uint64_t tengrad_cpu_xcr0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}

static inline int tengrad_cpu_vector_isa(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return TENGRAD_CPU_ISA_UNKNOWN;
    int isa = TENGRAD_CPU_ISA_SSE;
    int osxsave = (c >> 27) & 1, avx = (c >> 28) & 1, fma = (c >> 12) & 1;
    if (!osxsave || !avx) return isa;
    uint64_t xcr0 = tengrad_cpu_xcr0();
    if ((xcr0 & 0x6) != 0x6) return isa; /* the OS does not save YMM state */
    isa = TENGRAD_CPU_ISA_AVX;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return isa;
    if (((b >> 5) & 1) && fma) isa = TENGRAD_CPU_ISA_AVX2;
    int avx512 = ((b >> 16) & 1) && ((b >> 17) & 1) && ((b >> 30) & 1) && ((b >> 31) & 1);
    if (isa == TENGRAD_CPU_ISA_AVX2 && avx512 && (xcr0 & 0xe6) == 0xe6) isa = TENGRAD_CPU_ISA_AVX512;
    return isa;
}

/* The brand string (48 bytes and a NUL into out[49]), family and model (display values). */
static inline void tengrad_cpu_model(char out[49], int32_t *family, int32_t *model) {
    unsigned r[12], a, b, c, d;
    memset(out, 0, 49);
    *family = 0;
    *model = 0;
    if (__get_cpuid(1, &a, &b, &c, &d)) {
        unsigned base_family = (a >> 8) & 0xf, base_model = (a >> 4) & 0xf;
        *family = (int32_t)(base_family == 0xf ? base_family + ((a >> 20) & 0xff) : base_family);
        *model = (int32_t)((base_family == 0x6 || base_family == 0xf) ? (((a >> 16) & 0xf) << 4) | base_model
                                                                      : base_model);
    }
    if (__get_cpuid(0x80000000, &a, &b, &c, &d) && a >= 0x80000004) {
        for (unsigned i = 0; i < 3; i++)
            __get_cpuid(0x80000002 + i, &r[4 * i], &r[4 * i + 1], &r[4 * i + 2], &r[4 * i + 3]);
        memcpy(out, r, 48);
    }
}
#else
static inline int tengrad_cpu_vector_isa(void) { return TENGRAD_CPU_ISA_UNKNOWN; }
static inline void tengrad_cpu_model(char out[49], int32_t *family, int32_t *model) {
    memset(out, 0, 49);
    *family = 0;
    *model = 0;
}
#endif
#endif
