/* The model, data and numerics shared by the C trainers (mlp.c, mlp_mpi.c): see mlp_common.h. */
#include "mlp_common.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

/* ---- data ---------------------------------------------------------------------------------- */

static uint32_t read_be32(FILE *f) {
    unsigned char b[4] = {0, 0, 0, 0};
    if (fread(b, 1, 4, f) != 4) return 0;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | (uint32_t)b[3];
}

int load(const char *dir, const char *images_name, const char *labels_name, int64_t limit,
                dataset *out) {
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, images_name);
    FILE *fi = fopen(path, "rb");
    if (!fi) { fprintf(stderr, "cannot open %s\n", path); return 0; }
    snprintf(path, sizeof path, "%s/%s", dir, labels_name);
    FILE *fl = fopen(path, "rb");
    if (!fl) { fprintf(stderr, "cannot open %s\n", path); fclose(fi); return 0; }
    int ok = 0;
    unsigned char *raw = NULL;
    uint32_t magic_i = read_be32(fi), n = read_be32(fi), rows = read_be32(fi), cols = read_be32(fi);
    uint32_t magic_l = read_be32(fl), n_l = read_be32(fl);
    if (magic_i != 2051 || magic_l != 2049 || rows != 28 || cols != 28 || n != n_l) {
        fprintf(stderr, "%s: not a Fashion-MNIST IDX pair\n", dir);
        goto done;
    }
    out->n = (limit > 0 && limit < (int64_t)n) ? limit : (int64_t)n;
    out->images = (float *)malloc(sizeof(float) * (size_t)out->n * IN);
    out->labels = (uint8_t *)malloc((size_t)out->n);
    raw = (unsigned char *)malloc((size_t)out->n * IN);
    if (!out->images || !out->labels || !raw ||
        fread(raw, IN, (size_t)out->n, fi) != (size_t)out->n ||
        fread(out->labels, 1, (size_t)out->n, fl) != (size_t)out->n) {
        fprintf(stderr, "%s: short read\n", dir);
        free(raw);
        goto done;
    }
    /* Fashion-MNIST pixel mean 0.2860 and standard deviation 0.3530. */
    for (int64_t i = 0; i < out->n * IN; i++) out->images[i] = ((float)raw[i] / 255.0f - 0.2860f) / 0.3530f;
    free(raw);
    ok = 1;
done:
    fclose(fi);
    fclose(fl);
    return ok;
}

/* ---- model --------------------------------------------------------------------------------- */

uint64_t rng_state = 42;
uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
float uniform(void) { return (float)((next_u64() >> 40) * (1.0 / 16777216.0)); }

void init_mlp(mlp *net) { /* PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) */
    float r1 = 1.0f / sqrtf((float)IN), r2 = 1.0f / sqrtf((float)HIDDEN);
    for (int i = 0; i < HIDDEN * IN; i++) net->w1[i] = (2 * uniform() - 1) * r1;
    for (int i = 0; i < HIDDEN; i++) net->b1[i] = (2 * uniform() - 1) * r1;
    for (int i = 0; i < CLASSES * HIDDEN; i++) net->w2[i] = (2 * uniform() - 1) * r2;
    for (int i = 0; i < CLASSES; i++) net->b2[i] = (2 * uniform() - 1) * r2;
}

int alloc_workspace(workspace *ws, int64_t m) {
    ws->m = m;
    ws->z1 = (float *)malloc(sizeof(float) * (size_t)m * HIDDEN);
    ws->h = (float *)malloc(sizeof(float) * (size_t)m * HIDDEN);
    ws->dz1 = (float *)malloc(sizeof(float) * (size_t)m * HIDDEN);
    ws->z2 = (float *)malloc(sizeof(float) * (size_t)m * CLASSES);
    ws->dz2 = (float *)malloc(sizeof(float) * (size_t)m * CLASSES);
    return ws->z1 && ws->h && ws->dz1 && ws->z2 && ws->dz2;
}

void free_workspace(workspace *ws) {
    free(ws->z1); free(ws->h); free(ws->dz1); free(ws->z2); free(ws->dz2);
}

void forward(const mlp *net, const float *x, int64_t m, workspace *ws) {
    int mi = (int)m;
    for (int i = 0; i < mi; i++) memcpy(ws->z1 + (size_t)i * HIDDEN, net->b1, sizeof net->b1);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, HIDDEN, IN, 1, x, IN, net->w1, IN, 1, ws->z1, HIDDEN);
    for (int64_t i = 0; i < m * HIDDEN; i++) ws->h[i] = ws->z1[i] > 0 ? ws->z1[i] : 0;
    for (int i = 0; i < mi; i++) memcpy(ws->z2 + (size_t)i * CLASSES, net->b2, sizeof net->b2);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, CLASSES, HIDDEN, 1, ws->h, HIDDEN, net->w2, HIDDEN, 1,
                ws->z2, CLASSES);
}

double backward(const mlp *net, const uint8_t *y, workspace *ws, int64_t mean_over) {
    double loss = 0;
    int64_t m = ws->m;
    for (int64_t i = 0; i < m; i++) {
        float *z = ws->z2 + i * CLASSES, *d = ws->dz2 + i * CLASSES;
        float top = z[0];
        for (int k = 1; k < CLASSES; k++) top = z[k] > top ? z[k] : top;
        double sum = 0;
        for (int k = 0; k < CLASSES; k++) sum += exp((double)(z[k] - top));
        for (int k = 0; k < CLASSES; k++) {
            double p = exp((double)(z[k] - top)) / sum;
            d[k] = (float)((p - (k == y[i] ? 1.0 : 0.0)) / (double)mean_over);
        }
        loss += log(sum) - (double)(z[y[i]] - top);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, HIDDEN, CLASSES, 1, ws->dz2, CLASSES, net->w2,
                HIDDEN, 0, ws->dz1, HIDDEN);
    for (int64_t i = 0; i < m * HIDDEN; i++) if (ws->z1[i] <= 0) ws->dz1[i] = 0;
    return loss / (double)mean_over;
}

void gradients(const float *x, const workspace *ws, mlp *grad) {
    int m = (int)ws->m;
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, HIDDEN, IN, m, 1, ws->dz1, HIDDEN, x, IN, 0, grad->w1, IN);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, CLASSES, HIDDEN, m, 1, ws->dz2, CLASSES, ws->h, HIDDEN, 0,
                grad->w2, HIDDEN);
    memset(grad->b1, 0, sizeof grad->b1);
    memset(grad->b2, 0, sizeof grad->b2);
    for (int i = 0; i < m; i++) {
        for (int k = 0; k < HIDDEN; k++) grad->b1[k] += ws->dz1[(size_t)i * HIDDEN + k];
        for (int k = 0; k < CLASSES; k++) grad->b2[k] += ws->dz2[(size_t)i * CLASSES + k];
    }
}

void axpy_model(mlp *net, float alpha, const mlp *step) {
    float *p = (float *)net;
    const float *s = (const float *)step;
    size_t n = sizeof(mlp) / sizeof(float);
    for (size_t i = 0; i < n; i++) p[i] += alpha * s[i];
}

void evaluate(const mlp *net, const dataset *d, double *loss, double *accuracy) {
    workspace ws;
    if (!alloc_workspace(&ws, 1000)) { *loss = NAN; *accuracy = NAN; return; }
    double total = 0;
    int64_t correct = 0;
    for (int64_t start = 0; start < d->n; start += 1000) {
        int64_t m = d->n - start < 1000 ? d->n - start : 1000;
        ws.m = m;
        forward(net, d->images + start * IN, m, &ws);
        for (int64_t i = 0; i < m; i++) {
            const float *z = ws.z2 + i * CLASSES;
            int best = 0;
            for (int k = 1; k < CLASSES; k++) if (z[k] > z[best]) best = k;
            correct += best == d->labels[start + i];
        }
        total += backward(net, d->labels + start, &ws, m) * (double)m;
    }
    free_workspace(&ws);
    *loss = total / (double)d->n;
    *accuracy = (double)correct / (double)d->n;
}

double now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}


void sample_labels(const workspace *ws, uint64_t key, uint8_t *out) {
    for (int64_t i = 0; i < ws->m; i++) {
        const float *z = ws->z2 + i * CLASSES;
        float top = z[0];
        for (int k = 1; k < CLASSES; k++) top = z[k] > top ? z[k] : top;
        double p[CLASSES], sum = 0;
        for (int k = 0; k < CLASSES; k++) sum += (p[k] = exp((double)(z[k] - top)));
        uint64_t saved = rng_state;
        rng_state = key + (uint64_t)i; /* a draw keyed by the sample: any split of the batch draws alike */
        double u = uniform() * sum;
        rng_state = saved;
        int k = 0;
        while (k < CLASSES - 1 && (u -= p[k]) > 0) k++;
        out[i] = (uint8_t)k;
    }
}

int check(tengrad_preconditioner *p, tengrad_status s, const char *what) {
    if (s == TENGRAD_OK) return 1;
    fprintf(stderr, "%s: %s: %s\n", what, tengrad_status_string(s), tengrad_last_error(p));
    return 0;
}


int parse_integer(const char *option, const char *text, long long lo, long long hi, long long *out) {
    char *end = NULL;
    errno = 0;
    long long v = strtoll(text, &end, 10);
    if (errno || end == text || *end || v < lo || v > hi) {
        fprintf(stderr, "%s: expected an integer in [%lld, %lld], got '%s'\n", option, lo, hi, text);
        return 0;
    }
    *out = v;
    return 1;
}

int parse_real(const char *option, const char *text, double lo, double hi, double *out) {
    char *end = NULL;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || !isfinite(v) || v < lo || v > hi) {
        fprintf(stderr, "%s: expected a finite number in [%g, %g], got '%s'\n", option, lo, hi, text);
        return 0;
    }
    *out = v;
    return 1;
}
