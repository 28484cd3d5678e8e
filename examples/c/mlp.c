/*
 * A small but real C trainer: a 784-128-10 ReLU MLP on Fashion-MNIST, trained twice from the same
 * initialization — once with TENGraD's exact natural gradient (sampled-label Fisher by default, or
 * the one-call empirical path, with KL clipping) and once with plain SGD — printing training loss and
 * test accuracy side by side. The model and data code is in mlp_common.c (shared with mlp_mpi.c).
 *
 *   mlp --data DIR [--epochs N] [--batch M] [--lr-sgd X] [--lr-ng X] [--damping X] [--kl-clip X]
 *       [--fisher sampled|empirical] [--train-limit N] [--test-limit N] [--seed S] [--check]
 *
 * --fisher sampled (default) takes each step's curvature from a backward pass with labels drawn
 * from the model's softmax (the true Fisher, as in the paper) and preconditions the real gradient
 * with tengrad_precondition; --fisher empirical uses the one-call tengrad_natural_gradient_v2.
 *
 * DIR holds the four uncompressed IDX files (train-images-idx3-ubyte, ...). `make demo` unpacks
 * them from Debian's dataset-fashion-mnist. With --check the exit status is 1 unless TENGraD
 * lowered the training loss. Compiles as C11 and as C++17 with -Wall -Wextra -Werror.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mlp_common.h"

/* ---- training ------------------------------------------------------------------------------ */

typedef struct {
    int epochs;
    int64_t batch;
    float lr_sgd, lr_ng;
    double damping, kl_clip;
    int sampled; /* 1: curvature from labels sampled from the model (true Fisher); 0: empirical */
} settings;

typedef struct {
    double initial_loss, final_loss, test_accuracy, seconds;
} result;

/* One layer's batch for the library: its inputs and the loss gradients at its outputs. The loss
   is mean-reduced, so each sample got 1/m of its gradient: grad_scale = m. */
static tengrad_batch layer_batch(int64_t m, const float *inputs, const float *output_grads) {
    tengrad_batch b = TENGRAD_BATCH_INIT;
    b.batch = m;
    b.activations = inputs;
    b.output_grads = output_grads;
    b.grad_scale = (double)m;
    return b;
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
    int64_t labels_drawn = (int64_t)(next_u64() >> 2); /* keys of the sampled labels */
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
                sample_labels(&ws, (uint64_t)labels_drawn, ysampled);
                labels_drawn += cfg->batch;
                backward(net, ysampled, &ws, cfg->batch);
                tengrad_batch b1 = layer_batch(cfg->batch, xb, ws.dz1), b2 = layer_batch(cfg->batch, ws.h, ws.dz2);
                if (!check(p, tengrad_update_curvature_v2(p, l1, &b1), "update_curvature(1)") ||
                    !check(p, tengrad_update_curvature_v2(p, l2, &b2), "update_curvature(2)"))
                    goto done_ws;
                epoch_loss += backward(net, yb, &ws, cfg->batch);
                gradients(xb, &ws, step);
                if (!check(p, tengrad_precondition(p, l1, step->w1, step->b1, step->w1, step->b1), "precondition(1)") ||
                    !check(p, tengrad_precondition(p, l2, step->w2, step->b2, step->w2, step->b2), "precondition(2)"))
                    goto done_ws;
                double nu = 1;
                if (!check(p, tengrad_kl_clip_factor(p, cfg->lr_ng, cfg->kl_clip, &nu), "kl_clip_factor")) goto done_ws;
                axpy_model(net, -cfg->lr_ng * (float)nu, step);
                continue;
            }
            epoch_loss += backward(net, yb, &ws, cfg->batch);
            if (natural) {
                tengrad_batch b1 = layer_batch(cfg->batch, xb, ws.dz1), b2 = layer_batch(cfg->batch, ws.h, ws.dz2);
                if (!check(p, tengrad_natural_gradient_v2(p, l1, &b1, step->w1, step->b1), "natural_gradient(layer 1)") ||
                    !check(p, tengrad_natural_gradient_v2(p, l2, &b2, step->w2, step->b2), "natural_gradient(layer 2)"))
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
        long long n = 0;
        double x = 0;
        int ok = 1;
        if (!strcmp(a, "--data")) data = v;
        else if (!strcmp(a, "--epochs")) { ok = parse_integer(a, v, 1, 100000, &n); cfg.epochs = (int)n; }
        else if (!strcmp(a, "--batch")) { ok = parse_integer(a, v, 1, 1 << 20, &n); cfg.batch = n; }
        else if (!strcmp(a, "--lr-sgd")) { ok = parse_real(a, v, 0, 1e6, &x); cfg.lr_sgd = (float)x; }
        else if (!strcmp(a, "--lr-ng")) { ok = parse_real(a, v, 0, 1e6, &x); cfg.lr_ng = (float)x; }
        else if (!strcmp(a, "--damping")) { ok = parse_real(a, v, 1e-30, 1e30, &x); cfg.damping = x; }
        else if (!strcmp(a, "--kl-clip")) { ok = parse_real(a, v, 0, 1e30, &x); cfg.kl_clip = x; }
        else if (!strcmp(a, "--train-limit")) { ok = parse_integer(a, v, 0, INT64_MAX, &n); train_limit = n; }
        else if (!strcmp(a, "--test-limit")) { ok = parse_integer(a, v, 0, INT64_MAX, &n); test_limit = n; }
        else if (!strcmp(a, "--seed")) { ok = parse_integer(a, v, 0, INT64_MAX, &n); rng_state = (uint64_t)n; }
        else if (!strcmp(a, "--fisher")) {
            if (strcmp(v, "sampled") && strcmp(v, "empirical")) { fprintf(stderr, "--fisher sampled|empirical\n"); return 2; }
            cfg.sampled = !strcmp(v, "sampled");
        }
        else { fprintf(stderr, "unknown option %s\n", a); return 2; }
        if (!ok) return 2;
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
