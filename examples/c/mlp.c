/*
 * A small but real C trainer: a 784-128-10 ReLU MLP on Fashion-MNIST, trained twice from the same
 * initialization — once with TENGraD's exact natural gradient (sampled-label Fisher by default, or
 * the one-call empirical path, with KL clipping) and once with plain SGD — printing training loss and
 * test accuracy side by side. Forward and backward passes are cblas GEMMs.
 *
 *   mlp --data DIR [--epochs N] [--batch M] [--lr-sgd X] [--lr-ng X] [--damping X] [--kl-clip X]
 *       [--fisher sampled|empirical] [--train-limit N] [--test-limit N] [--seed S] [--check]
 *
 * --fisher sampled (default) takes each step's curvature from a backward pass with labels drawn
 * from the model's softmax (the true Fisher, as in the paper) and preconditions the real gradient
 * with tengrad_precondition; --fisher empirical uses the one-call tengrad_natural_gradient.
 *
 * DIR holds the four uncompressed IDX files (train-images-idx3-ubyte, ...). `make demo` unpacks
 * them from Debian's dataset-fashion-mnist. With --check the exit status is 1 unless TENGraD
 * lowered the training loss. Compiles as C11 and as C++17 with -Wall -Wextra -Werror.
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>

#include "tengrad.h"

enum { IN = 784, HIDDEN = 128, CLASSES = 10 };

typedef struct {
    float *images; /* [n][784], normalized */
    uint8_t *labels;
    int64_t n;
} dataset;

typedef struct {
    float w1[HIDDEN * IN], b1[HIDDEN];
    float w2[CLASSES * HIDDEN], b2[CLASSES];
} mlp;

typedef struct { /* activations and gradients of one batch */
    int64_t m;
    float *z1, *h, *z2, *dz1, *dz2;
} workspace;

/* ---- data ---------------------------------------------------------------------------------- */

static uint32_t read_be32(FILE *f) {
    unsigned char b[4] = {0, 0, 0, 0};
    if (fread(b, 1, 4, f) != 4) return 0;
    return ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | (uint32_t)b[3];
}

static int load(const char *dir, const char *images_name, const char *labels_name, int64_t limit,
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

static uint64_t rng_state = 42;
static uint64_t next_u64(void) { /* splitmix64 */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static float uniform(void) { return (float)((next_u64() >> 40) * (1.0 / 16777216.0)); }

static void init_mlp(mlp *net) { /* PyTorch's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) */
    float r1 = 1.0f / sqrtf((float)IN), r2 = 1.0f / sqrtf((float)HIDDEN);
    for (int i = 0; i < HIDDEN * IN; i++) net->w1[i] = (2 * uniform() - 1) * r1;
    for (int i = 0; i < HIDDEN; i++) net->b1[i] = (2 * uniform() - 1) * r1;
    for (int i = 0; i < CLASSES * HIDDEN; i++) net->w2[i] = (2 * uniform() - 1) * r2;
    for (int i = 0; i < CLASSES; i++) net->b2[i] = (2 * uniform() - 1) * r2;
}

static int alloc_workspace(workspace *ws, int64_t m) {
    ws->m = m;
    ws->z1 = (float *)malloc(sizeof(float) * (size_t)m * HIDDEN);
    ws->h = (float *)malloc(sizeof(float) * (size_t)m * HIDDEN);
    ws->dz1 = (float *)malloc(sizeof(float) * (size_t)m * HIDDEN);
    ws->z2 = (float *)malloc(sizeof(float) * (size_t)m * CLASSES);
    ws->dz2 = (float *)malloc(sizeof(float) * (size_t)m * CLASSES);
    return ws->z1 && ws->h && ws->dz1 && ws->z2 && ws->dz2;
}

static void free_workspace(workspace *ws) {
    free(ws->z1); free(ws->h); free(ws->dz1); free(ws->z2); free(ws->dz2);
}

/* Forward pass of m samples; z2 receives the logits. */
static void forward(const mlp *net, const float *x, int64_t m, workspace *ws) {
    int mi = (int)m;
    for (int i = 0; i < mi; i++) memcpy(ws->z1 + (size_t)i * HIDDEN, net->b1, sizeof net->b1);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, HIDDEN, IN, 1, x, IN, net->w1, IN, 1, ws->z1, HIDDEN);
    for (int64_t i = 0; i < m * HIDDEN; i++) ws->h[i] = ws->z1[i] > 0 ? ws->z1[i] : 0;
    for (int i = 0; i < mi; i++) memcpy(ws->z2 + (size_t)i * CLASSES, net->b2, sizeof net->b2);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, mi, CLASSES, HIDDEN, 1, ws->h, HIDDEN, net->w2, HIDDEN, 1,
                ws->z2, CLASSES);
}

/* Mean cross-entropy of the batch; dz2 receives d loss / d logits (mean-reduced: (p − y)/m),
   dz1 the gradient with respect to the first layer's outputs. Returns the loss. */
static double backward(const mlp *net, const uint8_t *y, workspace *ws) {
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
            d[k] = (float)((p - (k == y[i] ? 1.0 : 0.0)) / (double)m);
        }
        loss += log(sum) - (double)(z[y[i]] - top);
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, HIDDEN, CLASSES, 1, ws->dz2, CLASSES, net->w2,
                HIDDEN, 0, ws->dz1, HIDDEN);
    for (int64_t i = 0; i < m * HIDDEN; i++) if (ws->z1[i] <= 0) ws->dz1[i] = 0;
    return loss / (double)m;
}

/* Plain gradients: dW = dZᵀ X, db = Σ_i dZ_i (the loss is already mean-reduced). */
static void gradients(const float *x, const workspace *ws, mlp *grad) {
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

static void axpy_model(mlp *net, float alpha, const mlp *step) {
    float *p = (float *)net;
    const float *s = (const float *)step;
    size_t n = sizeof(mlp) / sizeof(float);
    for (size_t i = 0; i < n; i++) p[i] += alpha * s[i];
}

/* Mean loss and accuracy over a data set, in batches of 1000. */
static void evaluate(const mlp *net, const dataset *d, double *loss, double *accuracy) {
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
        total += backward(net, d->labels + start, &ws) * (double)m;
    }
    free_workspace(&ws);
    *loss = total / (double)d->n;
    *accuracy = (double)correct / (double)d->n;
}

static double now(void) {
    struct timespec ts;
    timespec_get(&ts, TIME_UTC);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ---- training ------------------------------------------------------------------------------ */

typedef struct {
    int epochs;
    int64_t batch;
    float lr_sgd, lr_ng;
    double damping, kl_clip;
    int sampled; /* 1: curvature from labels sampled from the model (true Fisher); 0: empirical */
} settings;

/* Labels drawn from the model's own predictive distribution softmax(z2), for the true Fisher. */
static void sample_labels(const workspace *ws, uint8_t *out) {
    for (int64_t i = 0; i < ws->m; i++) {
        const float *z = ws->z2 + i * CLASSES;
        float top = z[0];
        for (int k = 1; k < CLASSES; k++) top = z[k] > top ? z[k] : top;
        double p[CLASSES], sum = 0;
        for (int k = 0; k < CLASSES; k++) sum += (p[k] = exp((double)(z[k] - top)));
        double u = uniform() * sum;
        int k = 0;
        while (k < CLASSES - 1 && (u -= p[k]) > 0) k++;
        out[i] = (uint8_t)k;
    }
}

typedef struct {
    double initial_loss, final_loss, test_accuracy, seconds;
} result;

static int check(tengrad_preconditioner *p, tengrad_status s, const char *what) {
    if (s == TENGRAD_OK) return 1;
    fprintf(stderr, "%s: %s: %s\n", what, tengrad_status_string(s), tengrad_last_error(p));
    return 0;
}

/* Trains `net` in place; natural != 0 uses TENGraD, else plain SGD. */
static int train(mlp *net, int natural, const dataset *train_set, const dataset *test_set, const settings *cfg,
                 result *res) {
    workspace ws;
    mlp *step = (mlp *)calloc(1, sizeof(mlp));
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)train_set->n);
    float *xb = (float *)malloc(sizeof(float) * (size_t)cfg->batch * IN);
    uint8_t *yb = (uint8_t *)malloc((size_t)cfg->batch), *ysampled = (uint8_t *)malloc((size_t)cfg->batch);
    tengrad_preconditioner *p = NULL;
    int32_t l1 = -1, l2 = -1;
    int ok = 0;
    double test_loss = 0, seconds = 0;
    const char *name = natural ? "TENGraD" : "SGD";
    if (!step || !order || !xb || !yb || !ysampled || !alloc_workspace(&ws, cfg->batch)) goto done;
    if (natural) {
        if (!check(p, tengrad_create(&p), "tengrad_create") ||
            !check(p, tengrad_set_damping(p, cfg->damping), "tengrad_set_damping") ||
            !check(p, tengrad_add_linear(p, IN, HIDDEN, 1, &l1), "tengrad_add_linear") ||
            !check(p, tengrad_add_linear(p, HIDDEN, CLASSES, 1, &l2), "tengrad_add_linear"))
            goto done_ws;
    }
    evaluate(net, train_set, &res->initial_loss, &res->test_accuracy);
    for (int64_t i = 0; i < train_set->n; i++) order[i] = i;
    for (int epoch = 1; epoch <= cfg->epochs; epoch++) {
        for (int64_t i = train_set->n - 1; i > 0; i--) { /* Fisher–Yates shuffle */
            int64_t j = (int64_t)(next_u64() % (uint64_t)(i + 1)), t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
        double start = now(), epoch_loss = 0;
        int64_t steps = 0;
        for (int64_t s = 0; s + cfg->batch <= train_set->n; s += cfg->batch, steps++) {
            for (int64_t i = 0; i < cfg->batch; i++) {
                memcpy(xb + i * IN, train_set->images + order[s + i] * IN, sizeof(float) * IN);
                yb[i] = train_set->labels[order[s + i]];
            }
            ws.m = cfg->batch;
            forward(net, xb, cfg->batch, &ws);
            if (natural && cfg->sampled) {
                /* True Fisher: curvature from a backward pass with sampled labels, then the
                   gradient of the real labels preconditioned by it (the reuse path). */
                float scale = (float)cfg->batch;
                sample_labels(&ws, ysampled);
                backward(net, ysampled, &ws);
                if (!check(p, tengrad_update_curvature(p, l1, cfg->batch, xb, ws.dz1, scale), "update_curvature(1)") ||
                    !check(p, tengrad_update_curvature(p, l2, cfg->batch, ws.h, ws.dz2, scale), "update_curvature(2)"))
                    goto done_ws;
                epoch_loss += backward(net, yb, &ws);
                gradients(xb, &ws, step);
                if (!check(p, tengrad_precondition(p, l1, step->w1, step->b1, step->w1, step->b1), "precondition(1)") ||
                    !check(p, tengrad_precondition(p, l2, step->w2, step->b2, step->w2, step->b2), "precondition(2)"))
                    goto done_ws;
                double nu = 1;
                if (!check(p, tengrad_kl_clip_factor(p, cfg->lr_ng, cfg->kl_clip, &nu), "kl_clip_factor")) goto done_ws;
                axpy_model(net, -cfg->lr_ng * (float)nu, step);
                continue;
            }
            epoch_loss += backward(net, yb, &ws);
            if (natural) {
                /* Mean-reduced loss: each sample got 1/m of its gradient, so grad_scale = m. */
                float scale = (float)cfg->batch;
                if (!check(p, tengrad_natural_gradient(p, l1, cfg->batch, xb, ws.dz1, scale, step->w1, step->b1),
                           "natural_gradient(layer 1)") ||
                    !check(p, tengrad_natural_gradient(p, l2, cfg->batch, ws.h, ws.dz2, scale, step->w2, step->b2),
                           "natural_gradient(layer 2)"))
                    goto done_ws;
                double nu = 1;
                if (!check(p, tengrad_kl_clip_factor(p, cfg->lr_ng, cfg->kl_clip, &nu), "kl_clip_factor")) goto done_ws;
                axpy_model(net, -cfg->lr_ng * (float)nu, step);
            } else {
                gradients(xb, &ws, step);
                axpy_model(net, -cfg->lr_sgd, step);
            }
        }
        seconds += now() - start;
        evaluate(net, test_set, &test_loss, &res->test_accuracy);
        printf("  %-7s epoch %2d  train loss %.4f  test loss %.4f  test accuracy %.2f%%  (%.1f s)\n", name, epoch,
               epoch_loss / (double)(steps > 0 ? steps : 1), test_loss, 100 * res->test_accuracy, seconds);
        fflush(stdout);
    }
    evaluate(net, train_set, &res->final_loss, &test_loss);
    res->seconds = seconds;
    ok = 1;
done_ws:
    free_workspace(&ws);
done:
    tengrad_destroy(p);
    free(step); free(order); free(xb); free(yb); free(ysampled);
    return ok;
}

int main(int argc, char **argv) {
    const char *data = NULL;
    settings cfg = {5, 128, 0.1f, 0.2f, 1.0, 1e-2, 1};
    int64_t train_limit = 0, test_limit = 0;
    int check_loss = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--check")) { check_loss = 1; continue; }
        if (!v) { fprintf(stderr, "%s needs a value\n", a); return 2; }
        i++;
        if (!strcmp(a, "--data")) data = v;
        else if (!strcmp(a, "--epochs")) cfg.epochs = atoi(v);
        else if (!strcmp(a, "--batch")) cfg.batch = atoll(v);
        else if (!strcmp(a, "--lr-sgd")) cfg.lr_sgd = strtof(v, NULL);
        else if (!strcmp(a, "--lr-ng")) cfg.lr_ng = strtof(v, NULL);
        else if (!strcmp(a, "--damping")) cfg.damping = strtod(v, NULL);
        else if (!strcmp(a, "--kl-clip")) cfg.kl_clip = strtod(v, NULL);
        else if (!strcmp(a, "--train-limit")) train_limit = atoll(v);
        else if (!strcmp(a, "--test-limit")) test_limit = atoll(v);
        else if (!strcmp(a, "--seed")) rng_state = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--fisher")) {
            if (strcmp(v, "sampled") && strcmp(v, "empirical")) { fprintf(stderr, "--fisher sampled|empirical\n"); return 2; }
            cfg.sampled = !strcmp(v, "sampled");
        }
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
    }
    if (!data || cfg.epochs < 1 || cfg.batch < 1) {
        fprintf(stderr, "usage: %s --data DIR [--epochs N] [--batch M] [--lr-sgd X] [--lr-ng X] [--damping X]\n"
                        "          [--kl-clip X] [--fisher sampled|empirical] [--train-limit N] [--test-limit N] [--seed S]\n"
                        "          [--check]\n", argv[0]);
        return 2;
    }
    if (tengrad_version_number() != TENGRAD_VERSION_NUMBER) {
        fprintf(stderr, "libtengrad version %d does not match the header's %d\n", tengrad_version_number(),
                TENGRAD_VERSION_NUMBER);
        return 1;
    }
    dataset train_set = {NULL, NULL, 0}, test_set = {NULL, NULL, 0};
    if (!load(data, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", train_limit, &train_set) ||
        !load(data, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test_limit, &test_set))
        return 1;
    if (cfg.batch > train_set.n) cfg.batch = train_set.n;
    printf("Fashion-MNIST: %lld training and %lld test images; MLP 784-128-10, batch %lld, %d epochs\n",
           (long long)train_set.n, (long long)test_set.n, (long long)cfg.batch, cfg.epochs);
    printf("TENGraD: %s Fisher, lr %g, damping %g, KL clip %g    SGD: lr %g\n",
           cfg.sampled ? "sampled-label" : "empirical", cfg.lr_ng, cfg.damping, cfg.kl_clip, cfg.lr_sgd);

    mlp *initial = (mlp *)malloc(sizeof(mlp)), *net = (mlp *)malloc(sizeof(mlp));
    if (!initial || !net) return 1;
    init_mlp(initial);
    uint64_t seed = rng_state;
    result ng, sgd;
    memcpy(net, initial, sizeof(mlp));
    if (!train(net, 1, &train_set, &test_set, &cfg, &ng)) return 1;
    rng_state = seed; /* same shuffles for both */
    memcpy(net, initial, sizeof(mlp));
    if (!train(net, 0, &train_set, &test_set, &cfg, &sgd)) return 1;

    printf("\n%-8s %13s %13s %14s %10s\n", "", "initial loss", "final loss", "test accuracy", "seconds");
    printf("%-8s %13s %13s %14s %10s\n", "", "(train set)", "(train set)", "", "(training)");
    printf("%-8s %13.4f %13.4f %13.2f%% %10.2f\n", "TENGraD", ng.initial_loss, ng.final_loss,
           100 * ng.test_accuracy, ng.seconds);
    printf("%-8s %13.4f %13.4f %13.2f%% %10.2f\n", "SGD", sgd.initial_loss, sgd.final_loss,
           100 * sgd.test_accuracy, sgd.seconds);
    free(initial); free(net);
    free(train_set.images); free(train_set.labels); free(test_set.images); free(test_set.labels);
    if (check_loss && !(ng.final_loss < ng.initial_loss)) {
        fprintf(stderr, "check failed: TENGraD did not lower the training loss (%.4f -> %.4f)\n", ng.initial_loss,
                ng.final_loss);
        return 1;
    }
    if (check_loss) printf("check passed: TENGraD lowered the training loss %.4f -> %.4f\n", ng.initial_loss,
                           ng.final_loss);
    return 0;
}
