/* The core's passes outside BLAS in AVX2 + FMA (tengrad_passes.h). In a profile of the 256²,
   m = 32 precondition (AMD EPYC Zen 3 VM), the core's Swift loops, compiled for baseline x86-64
   (SSE2), took 9.6 µs for the sum of squares, 9 for the (1/λ)v pass and 5.6 for the diagonal
   product; these take 4.5, 6.5 and 1.2 (docs/DESIGN.md §10). */
#include "tengrad_passes.h"

#if defined(__x86_64__)
#include "avx2.h"

AVX2 static inline __m256d squares4(const float *x, __m256d s) {
    __m256d d = _mm256_cvtps_pd(_mm_loadu_ps(x));
    return _mm256_fmadd_pd(d, d, s);
}

/* Eight accumulators: the conversions and FMAs of one chain wait 4 cycles on the last FMA, and
   eight chains keep both FMA ports busy (64K floats: four chains 5.2 µs, eight 3.4). */
AVX2 double tengrad_k_sum_squares(const float *x, int64_t n) {
    __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = squares4(x + i, a0);
        a1 = squares4(x + i + 4, a1);
        a2 = squares4(x + i + 8, a2);
        a3 = squares4(x + i + 12, a3);
        a4 = squares4(x + i + 16, a4);
        a5 = squares4(x + i + 20, a5);
        a6 = squares4(x + i + 24, a6);
        a7 = squares4(x + i + 28, a7);
    }
    for (; i + 4 <= n; i += 4) a0 = squares4(x + i, a0);
    __m256d s = _mm256_add_pd(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)),
                              _mm256_add_pd(_mm256_add_pd(a4, a5), _mm256_add_pd(a6, a7)));
    double lanes[4];
    _mm256_storeu_pd(lanes, s);
    double sum = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
    for (; i < n; i++) sum += (double)x[i] * (double)x[i];
    return sum;
}

AVX2 void tengrad_k_scale(const float *x, float beta, float *y, int64_t n, int stream) {
    const __m256 b = _mm256_set1_ps(beta);
    int64_t i = 0;
    if (stream) {
        /* Stores that bypass the cache: no read of y's lines first (a third of the traffic). */
        for (; i < n && ((uintptr_t)(y + i) & 31); i++) y[i] = beta * x[i];
        for (; i + 16 <= n; i += 16) {
            __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
            _mm256_stream_ps(y + i, _mm256_mul_ps(u, b));
            _mm256_stream_ps(y + i + 8, _mm256_mul_ps(v, b));
        }
        _mm_sfence();
    }
    for (; i + 16 <= n; i += 16) {
        __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
        _mm256_storeu_ps(y + i, _mm256_mul_ps(u, b));
        _mm256_storeu_ps(y + i + 8, _mm256_mul_ps(v, b));
    }
    for (; i < n; i++) y[i] = beta * x[i];
}

/* Eight positions at a time: their G rows, eight channels at a time, transposed in registers so
   that channel o's eight values meet T's row o (contiguous over the positions). Scalar loops for
   the last positions and channels. */
AVX2 void tengrad_k_diagonal_product(const float *t, int64_t n, const float *g, int64_t ld, int64_t cols, float *out) {
    int64_t q0 = 0;
    for (; q0 + 8 <= n; q0 += 8) {
        __m256 acc0 = _mm256_loadu_ps(out + q0), acc1 = _mm256_setzero_ps();
        const float *rows = g + q0 * ld;
        int64_t o0 = 0;
        for (; o0 + 8 <= cols; o0 += 8) {
            __m256 c[8];
            transpose8x8(rows + o0, ld, c);
            const float *trow = t + o0 * n + q0;
            for (int k = 0; k < 8; k += 2) {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(trow + k * n), c[k], acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(trow + (k + 1) * n), c[k + 1], acc1);
            }
        }
        float sums[8];
        _mm256_storeu_ps(sums, _mm256_add_ps(acc0, acc1));
        for (int k = 0; k < 8; k++) {
            const float *row = rows + k * ld;
            for (int64_t o = o0; o < cols; o++) sums[k] += t[o * n + q0 + k] * row[o];
            out[q0 + k] = sums[k];
        }
    }
    for (int64_t q = q0; q < n; q++) {
        float sum = out[q];
        const float *row = g + q * ld;
        for (int64_t o = 0; o < cols; o++) sum += t[o * n + q] * row[o];
        out[q] = sum;
    }
}

/* Row q of out (cols floats, contiguous) = w_q · row q of g (stride ldg), w_q = (float)(alpha_s ·
   x[q / positions]); with sums, sums[c] = Σ_q out[q][c] in order of q (the first row copied,
   then each added: the bits of the portable loops). One pass over G instead of two. */
AVX2 void tengrad_k_scaled_rows(int64_t rows, int64_t cols, const float *g, int64_t ldg, const double *x, double alpha_s,
                                int64_t positions, float *out, float *sums) {
    for (int64_t q = 0; q < rows; q++) {
        const float w = (float)(alpha_s * x[q / positions]);
        const __m256 b = _mm256_set1_ps(w);
        const float *row = g + q * ldg;
        float *dst = out + q * cols;
        int64_t c = 0;
        for (; c + 8 <= cols; c += 8) {
            const __m256 y = _mm256_mul_ps(_mm256_loadu_ps(row + c), b);
            _mm256_storeu_ps(dst + c, y);
            if (sums) _mm256_storeu_ps(sums + c, q == 0 ? y : _mm256_add_ps(_mm256_loadu_ps(sums + c), y));
        }
        for (; c < cols; c++) {
            dst[c] = w * row[c];
            if (sums) sums[c] = q == 0 ? dst[c] : sums[c] + dst[c];
        }
    }
}

/* k[j·m + i] = k[i·m + j] for i in [i0, i1), j in [j0, j1), only j < i when below: 4 × 4 blocks
   transposed in registers, so each line of the written side is stored once per block rather
   than a double at a time (at power-of-two m its rows share one L1 set). Copies: exact. */
AVX2 void tengrad_k_mirror(double *k, int64_t m, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int below) {
    for (int64_t i = i0; i < i1; i += 4) {
        const int64_t ie = i + 4 <= i1 ? i + 4 : i1;
        const int64_t jl = below && ie < j1 ? ie : j1;
        for (int64_t j = j0; j < jl; j += 4) {
            const int64_t je = j + 4 <= jl ? j + 4 : jl;
            if (ie - i == 4 && je - j == 4 && (!below || j + 4 <= i)) {
                const double *s = k + i * m + j;
                const __m256d r0 = _mm256_loadu_pd(s), r1 = _mm256_loadu_pd(s + m);
                const __m256d r2 = _mm256_loadu_pd(s + 2 * m), r3 = _mm256_loadu_pd(s + 3 * m);
                const __m256d t0 = _mm256_unpacklo_pd(r0, r1), t1 = _mm256_unpackhi_pd(r0, r1);
                const __m256d t2 = _mm256_unpacklo_pd(r2, r3), t3 = _mm256_unpackhi_pd(r2, r3);
                double *d = k + j * m + i;
                _mm256_storeu_pd(d, _mm256_permute2f128_pd(t0, t2, 0x20));
                _mm256_storeu_pd(d + m, _mm256_permute2f128_pd(t1, t3, 0x20));
                _mm256_storeu_pd(d + 2 * m, _mm256_permute2f128_pd(t0, t2, 0x31));
                _mm256_storeu_pd(d + 3 * m, _mm256_permute2f128_pd(t1, t3, 0x31));
            } else {
                for (int64_t a = i; a < ie; a++)
                    for (int64_t b = j; b < je && (!below || b < a); b++) k[b * m + a] = k[a * m + b];
            }
        }
    }
}

#else
/* Not x86-64: the core never calls these (its CPU check fails). */
double tengrad_k_sum_squares(const float *x, int64_t n) {
    (void)x;
    (void)n;
    return 0;
}
void tengrad_k_scale(const float *x, float beta, float *y, int64_t n, int stream) {
    (void)stream;
    (void)x;
    (void)beta;
    (void)y;
    (void)n;
}
void tengrad_k_diagonal_product(const float *t, int64_t n, const float *g, int64_t ld, int64_t cols, float *out) {
    (void)t;
    (void)n;
    (void)g;
    (void)ld;
    (void)cols;
    (void)out;
}
void tengrad_k_scaled_rows(int64_t rows, int64_t cols, const float *g, int64_t ldg, const double *x, double alpha_s,
                           int64_t positions, float *out, float *sums) {
    (void)rows;
    (void)cols;
    (void)g;
    (void)ldg;
    (void)x;
    (void)alpha_s;
    (void)positions;
    (void)out;
    (void)sums;
}
void tengrad_k_mirror(double *k, int64_t m, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int below) {
    (void)k;
    (void)m;
    (void)i0;
    (void)i1;
    (void)j0;
    (void)j1;
    (void)below;
}
#endif
