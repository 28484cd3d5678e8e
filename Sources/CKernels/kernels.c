/* The linear precondition's kernels (tengrad_kernels.h). Register tiles: 6 rows × 16 columns,
   twelve 8-lane accumulators (of the 16 AVX2 registers); the first product runs in blocks of 256
   features so its packed panel stays in L1/L2 while the rows of V stream through, the second in
   blocks of 256 columns so its packed panels stay in L2 across a tile's rows. */
#include "tengrad_kernels.h"
#include <math.h>
#include <stddef.h>
#include <string.h>

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Rows i0..in of one panel of Aᵀ (positions p..p+width), a float at a time, zero past n. */
static void pack_positions_from(int64_t in, const float *a, int64_t lda, float *panel, int64_t p, int64_t width,
                                int64_t i0) {
    for (int64_t i = i0; i < in; i++) {
        float *row = panel + i * 16;
        for (int64_t j = 0; j < width; j++) row[j] = a[(p + j) * lda + i];
        for (int64_t j = width; j < 16; j++) row[j] = 0;
    }
}

#if !defined(__x86_64__)
void tengrad_k_pack_positions(int64_t n, int64_t in, const float *a, int64_t lda, float *ap) {
    for (int64_t p = 0; p < n; p += 16) pack_positions_from(in, a, lda, ap + p * in, p, min64(16, n - p), 0);
}
#endif

void tengrad_k_pack_features(int64_t n, int64_t in, int64_t shift, const float *a, int64_t lda, float *ap) {
    for (int64_t k = 0; 16 * k - shift < in; k++) {
        float *panel = ap + 16 * k * n;
        const int64_t c = 16 * k - shift, lo = c < 0 ? -c : 0, hi = min64(16, in - c);
        for (int64_t q = 0; q < n; q++) {
            float *row = panel + q * 16;
            for (int64_t j = 0; j < lo; j++) row[j] = 0;
            memcpy(row + lo, a + q * lda + c + lo, (size_t)(hi - lo) * sizeof(float));
            for (int64_t j = hi; j < 16; j++) row[j] = 0;
        }
    }
}

void tengrad_k_pack_gradients(int64_t n, int64_t out, const float *g, int64_t ldg, const float *w, float *gp) {
    /* Row by row of G: a walk down its columns touched n lines 4·ldg bytes apart, all in one L1
       set when ldg is a power of two (1024 × 32: 14.5 µs, this way 6.1). */
    for (int64_t q = 0; q < n; q++) {
        const float *row = g + q * ldg;
        const float wq = w[q];
        for (int64_t o = 0; o < out; o += 6) {
            float *tile = gp + o * n + q * 6;
            const int64_t rows = min64(6, out - o);
            for (int64_t k = 0; k < rows; k++) tile[k] = wq * row[o + k];
            for (int64_t k = rows; k < 6; k++) tile[k] = 0;
        }
    }
}

#if defined(__x86_64__)
#include "avx2.h"
enum { KBLOCK = 256, CBLOCK = 256 };

static int64_t take(int64_t *next) { return __atomic_fetch_add(next, 1, __ATOMIC_RELAXED); }

/* ---- Aᵀ packed ---- */

/* 8 rows of 8 floats (row stride lda) transposed into 8 rows of 8 at stride 16. */
AVX2 static inline void transpose8(const float *a, int64_t lda, float *out) {
    __m256 r[8];
    transpose8x8(a, lda, r);
    for (int k = 0; k < 8; k++) _mm256_storeu_ps(out + k * 16, r[k]);
}

/* Full panels in 8 × 8 blocks transposed in registers: a float at a time, the 16 rows read in
   turn were 4·lda bytes apart, all in one L1 set when lda is a power of two (1024 features × 32
   positions: 31 µs, this way 6). */
AVX2 void tengrad_k_pack_positions(int64_t n, int64_t in, const float *a, int64_t lda, float *ap) {
    for (int64_t p = 0; p < n; p += 16) {
        float *panel = ap + p * in;
        const int64_t width = min64(16, n - p);
        int64_t i = 0;
        if (width == 16)
            for (; i + 8 <= in; i += 8) {
                transpose8(a + p * lda + i, lda, panel + i * 16);
                transpose8(a + (p + 8) * lda + i, lda, panel + i * 16 + 8);
            }
        pack_positions_from(in, a, lda, panel, p, width, i);
    }
}

/* ---- T = V Aᵀ with the rows' sums of squares ---- */

AVX2 static inline __m256d squares8(const float *x, __m256d s) {
    __m256 v = _mm256_loadu_ps(x);
    __m256d d = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
    s = _mm256_fmadd_pd(d, d, s);
    d = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
    return _mm256_fmadd_pd(d, d, s);
}

/* Σ x[i]² for i in [k0, k1), onto s (vector part) and *tail (scalar part). Four accumulators: one
   chains each FMA on the last one's result (4 cycles) and ran at a float a cycle, slower than
   the 32 products each float of V feeds (1024², 32 positions, one thread: T with the squares
   1.07 ms, OpenBLAS's GEMM alone 0.86; with four accumulators, after the products, 0.83). */
AVX2 static __m256d squares(const float *x, int64_t k0, int64_t k1, __m256d s, double *tail) {
    __m256d s1 = _mm256_setzero_pd(), s2 = s1, s3 = s1;
    int64_t i = k0;
    for (; i + 32 <= k1; i += 32) {
        s = squares8(x + i, s);
        s1 = squares8(x + i + 8, s1);
        s2 = squares8(x + i + 16, s2);
        s3 = squares8(x + i + 24, s3);
    }
    for (; i + 8 <= k1; i += 8) s = squares8(x + i, s);
    for (; i < k1; i++) *tail += (double)x[i] * (double)x[i];
    return _mm256_add_pd(_mm256_add_pd(s, s1), _mm256_add_pd(s2, s3));
}

/* Rows r..r+rows (rows ≤ 6) of T, positions p..p+16, features k0..k1, onto T's partial sums. */
AVX2 static void project_block(const tengrad_k_project_job *j, int64_t r, int64_t rows, int64_t p, int64_t k0, int64_t k1) {
    const int64_t in = j->in, n = j->n;
    const int64_t width = min64(16, n - p);
    float part[6][16];
    __m256 c[6][2];
    for (int k = 0; k < 6; k++) {
        if (k0 == 0 || k >= rows) {
            c[k][0] = _mm256_setzero_ps();
            c[k][1] = _mm256_setzero_ps();
        } else if (width == 16) {
            c[k][0] = _mm256_loadu_ps(j->t + (r + k) * n + p);
            c[k][1] = _mm256_loadu_ps(j->t + (r + k) * n + p + 8);
        } else {
            memset(part[k], 0, sizeof part[k]);
            memcpy(part[k], j->t + (r + k) * n + p, (size_t)width * sizeof(float));
            c[k][0] = _mm256_loadu_ps(part[k]);
            c[k][1] = _mm256_loadu_ps(part[k] + 8);
        }
    }
    const float *ap = j->ap + p * in + k0 * 16;
    const float *x = j->v + r * in + k0;
    if (rows == 6) {
        __m256 c00 = c[0][0], c01 = c[0][1], c10 = c[1][0], c11 = c[1][1], c20 = c[2][0], c21 = c[2][1];
        __m256 c30 = c[3][0], c31 = c[3][1], c40 = c[4][0], c41 = c[4][1], c50 = c[5][0], c51 = c[5][1];
        for (int64_t i = k0; i < k1; i++, x++, ap += 16) {
            __m256 a0 = _mm256_loadu_ps(ap), a1 = _mm256_loadu_ps(ap + 8), b;
            b = _mm256_broadcast_ss(x);          c00 = _mm256_fmadd_ps(b, a0, c00); c01 = _mm256_fmadd_ps(b, a1, c01);
            b = _mm256_broadcast_ss(x + in);     c10 = _mm256_fmadd_ps(b, a0, c10); c11 = _mm256_fmadd_ps(b, a1, c11);
            b = _mm256_broadcast_ss(x + 2 * in); c20 = _mm256_fmadd_ps(b, a0, c20); c21 = _mm256_fmadd_ps(b, a1, c21);
            b = _mm256_broadcast_ss(x + 3 * in); c30 = _mm256_fmadd_ps(b, a0, c30); c31 = _mm256_fmadd_ps(b, a1, c31);
            b = _mm256_broadcast_ss(x + 4 * in); c40 = _mm256_fmadd_ps(b, a0, c40); c41 = _mm256_fmadd_ps(b, a1, c41);
            b = _mm256_broadcast_ss(x + 5 * in); c50 = _mm256_fmadd_ps(b, a0, c50); c51 = _mm256_fmadd_ps(b, a1, c51);
        }
        c[0][0] = c00; c[0][1] = c01; c[1][0] = c10; c[1][1] = c11; c[2][0] = c20; c[2][1] = c21;
        c[3][0] = c30; c[3][1] = c31; c[4][0] = c40; c[4][1] = c41; c[5][0] = c50; c[5][1] = c51;
    } else {
        for (int64_t k = 0; k < rows; k++) {
            __m256 c0 = c[k][0], c1 = c[k][1];
            const float *xk = x + k * in, *a = ap;
            for (int64_t i = k0; i < k1; i++, xk++, a += 16) {
                __m256 b = _mm256_broadcast_ss(xk);
                c0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(a), c0);
                c1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(a + 8), c1);
            }
            c[k][0] = c0;
            c[k][1] = c1;
        }
    }
    for (int64_t k = 0; k < rows; k++) {
        float *t = j->t + (r + k) * n + p;
        if (width == 16) {
            _mm256_storeu_ps(t, c[k][0]);
            _mm256_storeu_ps(t + 8, c[k][1]);
        } else {
            _mm256_storeu_ps(part[k], c[k][0]);
            _mm256_storeu_ps(part[k] + 8, c[k][1]);
            memcpy(t, part[k], (size_t)width * sizeof(float));
        }
    }
}

AVX2 void tengrad_k_project_work(tengrad_k_project_job *shared) {
    /* The fields from a copy of this thread's own: the counter's cache line moves between the
       threads at every tile taken. `next` is the last field. */
    tengrad_k_project_job job;
    memcpy(&job, shared, offsetof(tengrad_k_project_job, next));
    const tengrad_k_project_job *j = &job;
    const int64_t tiles = (j->out + TENGRAD_K_TILE_ROWS - 1) / TENGRAD_K_TILE_ROWS;
    for (int64_t tile; (tile = take(&shared->next)) < tiles;) {
        const int64_t r0 = tile * TENGRAD_K_TILE_ROWS, r1 = min64(r0 + TENGRAD_K_TILE_ROWS, j->out);
        __m256d s = _mm256_setzero_pd();
        double tail = 0;
        for (int64_t k0 = 0; k0 < j->in; k0 += KBLOCK) {
            const int64_t k1 = min64(k0 + KBLOCK, j->in);
            for (int64_t r = r0; r < r1; r += 6) {
                const int64_t rows = min64(6, r1 - r);
                for (int64_t p = 0; p < j->n; p += 16) project_block(j, r, rows, p, k0, k1);
                /* After the products: these rows of V are in L1 now. */
                for (int64_t k = 0; k < rows; k++) s = squares(j->v + (r + k) * j->in, k0, k1, s, &tail);
            }
        }
        double lanes[4];
        _mm256_storeu_pd(lanes, s);
        j->tile_sums[tile] = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + tail;
    }
}

/* ---- W = β V + Gsᵀ A ---- */

/* Rows r..r+rows (rows ≤ 6) of W, one panel: features c = 16·panel − shift .. c + 16 within
   [0, in). */
AVX2 static void apply_block(const tengrad_k_apply_job *j, int64_t r, int64_t rows, int64_t panel) {
    const int64_t n = j->n, in = j->in, c = 16 * panel - j->shift;
    const float *g = j->gp + r * n;  /* the tile of rows r..r+6: [q][6] */
    const float *ap = j->ap + 16 * panel * n;
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
    __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t q = 0; q < n; q++, g += 6, ap += 16) {
        __m256 a0 = _mm256_loadu_ps(ap), a1 = _mm256_loadu_ps(ap + 8), b;
        b = _mm256_broadcast_ss(g);     c00 = _mm256_fmadd_ps(b, a0, c00); c01 = _mm256_fmadd_ps(b, a1, c01);
        b = _mm256_broadcast_ss(g + 1); c10 = _mm256_fmadd_ps(b, a0, c10); c11 = _mm256_fmadd_ps(b, a1, c11);
        b = _mm256_broadcast_ss(g + 2); c20 = _mm256_fmadd_ps(b, a0, c20); c21 = _mm256_fmadd_ps(b, a1, c21);
        b = _mm256_broadcast_ss(g + 3); c30 = _mm256_fmadd_ps(b, a0, c30); c31 = _mm256_fmadd_ps(b, a1, c31);
        b = _mm256_broadcast_ss(g + 4); c40 = _mm256_fmadd_ps(b, a0, c40); c41 = _mm256_fmadd_ps(b, a1, c41);
        b = _mm256_broadcast_ss(g + 5); c50 = _mm256_fmadd_ps(b, a0, c50); c51 = _mm256_fmadd_ps(b, a1, c51);
    }
    __m256 acc[6][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41}, {c50, c51}};
    const __m256 beta = _mm256_set1_ps(j->beta);
    const int64_t lo = c < 0 ? -c : 0, hi = min64(16, in - c);
    for (int64_t k = 0; k < rows; k++) {
        const float *v = j->v + (r + k) * in + c;
        float *w = j->w + (r + k) * in + c;
        if (lo == 0 && hi == 16) {
            __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8);
            _mm256_storeu_ps(w, _mm256_fmadd_ps(beta, v0, acc[k][0]));
            _mm256_storeu_ps(w + 8, _mm256_fmadd_ps(beta, v1, acc[k][1]));
        } else {
            float part[16];
            _mm256_storeu_ps(part, acc[k][0]);
            _mm256_storeu_ps(part + 8, acc[k][1]);
            for (int64_t i = lo; i < hi; i++) w[i] = fmaf(j->beta, v[i], part[i]);
        }
    }
}

AVX2 void tengrad_k_apply_work(tengrad_k_apply_job *shared) {
    tengrad_k_apply_job job;  /* as in tengrad_k_project_work */
    memcpy(&job, shared, offsetof(tengrad_k_apply_job, next));
    const tengrad_k_apply_job *j = &job;
    const int64_t tiles = (j->out + TENGRAD_K_TILE_ROWS - 1) / TENGRAD_K_TILE_ROWS;
    const int64_t panels = (j->in + j->shift + 15) / 16;
    for (int64_t tile; (tile = take(&shared->next)) < tiles;) {
        const int64_t r0 = tile * TENGRAD_K_TILE_ROWS, r1 = min64(r0 + TENGRAD_K_TILE_ROWS, j->out);
        /* Column blocks whose packed panels (CBLOCK·n floats) stay in L2 across the tile's rows. */
        for (int64_t k0 = 0; k0 < panels; k0 += CBLOCK / 16)
            for (int64_t r = r0; r < r1; r += 6)
                for (int64_t k = k0; k < min64(k0 + CBLOCK / 16, panels); k++) apply_block(j, r, min64(6, r1 - r), k);
    }
}

#else
/* Not x86-64: the core never calls the kernels (its CPU check fails). */
void tengrad_k_project_work(tengrad_k_project_job *j) { (void)j; }
void tengrad_k_apply_work(tengrad_k_apply_job *j) { (void)j; }
#endif
