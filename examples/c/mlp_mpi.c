/*
 * Data-parallel TENGraD under MPI: the 784-128-10 MLP of mlp.c trained on P processes, each with
 * its share of every global batch, with the exact Fisher block of the **global** batch
 * (docs/DESIGN.md §11). The library is not MPI-aware and does not link MPI: this trainer moves the
 * rows with MPI collectives and calls the plain C ABI.
 *
 *   mpirun -np 2 mlp_mpi --data DIR [--epochs N] [--batch M] [--lr X] [--damping X] [--kl-clip X]
 *       [--fisher sampled|empirical] [--update-freq N] [--train-limit N] [--test-limit N]
 *       [--seed S] [--verify K] [--check]
 *
 * Every rank loads the data, initializes the same network and shuffles alike; rank r takes rows
 * [M·r/P, M·(r+1)/P) of each global batch of M (uneven when P does not divide M). Each layer has
 * an owner rank (greedy by cost, identical on every rank without communication). One step:
 *
 *   refresh steps: the layer's per-sample rows (inputs, output gradients × M) are gathered to its
 *                  owner (MPI_Gatherv), which calls tengrad_update_curvature with m = M;
 *   every step:    the local parts of the mean gradient are summed on the owner (MPI_Reduce),
 *                  which calls tengrad_precondition and broadcasts the update (MPI_Bcast);
 *   then one MPI_Allreduce of [failures, Σ ⟨update, grad⟩ of owned layers]: any failure stops
 *                  every rank before the weights change; ν for KL clipping from the global sum.
 *
 * --verify K: for the first K steps rank 0 also computes the single-process update on the whole
 * global batch with its own handle and prints the relative difference (the run fails above 1e-4).
 * At the end all ranks compare their weights bitwise. --check: exit 1 unless the training loss
 * fell. --fail-at K (a test of failure handling): the last rank's gradient gets a NaN at step K;
 * the owner's tengrad_precondition refuses it and every rank stops with status 1. Compiles as C11 (mpicc) with -Wall -Wextra -Werror.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <mpi.h>

#include "mlp_common.h"

enum { LAYERS = 2 };

typedef struct {
    int epochs, update_freq, verify, sampled;
    int64_t fail_at; /* testing: the last rank sends a NaN gradient at this step (-1: never) */
    int64_t batch;
    float lr;
    double damping, kl_clip;
} settings;

/* Layer l's shape and its slices of the flat model (weights then bias, as in struct mlp). */
static const int64_t layer_in[LAYERS] = {IN, HIDDEN}, layer_out[LAYERS] = {HIDDEN, CLASSES};

static float *layer_params(mlp *net, int l) { return l == 0 ? net->w1 : net->w2; }
static int64_t layer_size(int l) { return layer_out[l] * (layer_in[l] + 1); }

/* Owner of each layer, identical on every rank: the library's greedy assignment by cost (a
   refresh's row length + 4 · parameters), as tengrad.torch uses. */
static int owner_map(int size, int32_t owners[LAYERS]) {
    int64_t cost[LAYERS];
    for (int l = 0; l < LAYERS; l++) cost[l] = layer_in[l] + layer_out[l] + 4 * layer_size(l);
    return tengrad_assign_owners(cost, LAYERS, size, owners) == TENGRAD_OK;
}

typedef struct {
    int rank, size;
    int32_t owners[LAYERS];
    int counts[64 + 1], displs[64 + 1]; /* rows of every rank in a global batch; offsets */
} layout;

/* One layer's rows of this rank gathered to the owner into `all` (M × cols, rank order). */
static void gather_rows(const layout *lo, int owner, const float *mine, int64_t cols, float *all) {
    int counts[64], displs[64];
    for (int r = 0; r < lo->size; r++) {
        counts[r] = lo->counts[r] * (int)cols;
        displs[r] = lo->displs[r] * (int)cols;
    }
    MPI_Gatherv(mine, counts[lo->rank], MPI_FLOAT, all, counts, displs, MPI_FLOAT, owner, MPI_COMM_WORLD);
}

typedef struct {
    tengrad_preconditioner *p;
    int32_t id[LAYERS];
} handle;

static int open_handle(handle *h, double damping) {
    h->p = NULL;
    return check(h->p, tengrad_create(&h->p), "tengrad_create") &&
           check(h->p, tengrad_set_damping(h->p, damping), "tengrad_set_damping") &&
           check(h->p, tengrad_add_linear(h->p, IN, HIDDEN, 1, &h->id[0]), "tengrad_add_linear") &&
           check(h->p, tengrad_add_linear(h->p, HIDDEN, CLASSES, 1, &h->id[1]), "tengrad_add_linear");
}

/* Inputs and output gradients of layer l in a workspace filled by forward/backward. */
static const float *layer_inputs(const workspace *ws, const float *x, int l) { return l == 0 ? x : ws->h; }
static const float *layer_grads(const workspace *ws, int l) { return l == 0 ? ws->dz1 : ws->dz2; }

/* The single-process update on the whole global batch (rank 0, --verify): `out` = ν · update. */
static int reference_update(handle *ref, const mlp *net, const float *x, const uint8_t *y, int64_t m, int refresh,
                            int sampled, uint64_t key, const settings *cfg, mlp *out) {
    workspace ws;
    uint8_t *ys = (uint8_t *)malloc((size_t)m);
    int ok = ys && alloc_workspace(&ws, m);
    if (!ok) { free(ys); return 0; }
    forward(net, x, m, &ws);
    if (refresh && sampled) {
        sample_labels(&ws, key, ys);
        backward(net, ys, &ws, m);
        for (int l = 0; l < LAYERS && ok; l++)
            ok = check(ref->p, tengrad_update_curvature(ref->p, ref->id[l], m, layer_inputs(&ws, x, l),
                                                        layer_grads(&ws, l), (float)m), "reference curvature");
    }
    backward(net, y, &ws, m);
    if (refresh && !sampled)
        for (int l = 0; l < LAYERS && ok; l++)
            ok = check(ref->p, tengrad_update_curvature(ref->p, ref->id[l], m, layer_inputs(&ws, x, l),
                                                        layer_grads(&ws, l), (float)m), "reference curvature");
    gradients(x, &ws, out);
    for (int l = 0; l < LAYERS && ok; l++) {
        float *w = layer_params(out, l), *b = w + layer_out[l] * layer_in[l];
        ok = check(ref->p, tengrad_precondition(ref->p, ref->id[l], w, b, w, b), "reference precondition");
    }
    double nu = 1;
    if (ok && cfg->kl_clip > 0) ok = check(ref->p, tengrad_kl_clip_factor(ref->p, cfg->lr, cfg->kl_clip, &nu), "kl");
    axpy_model(out, (float)nu - 1.0f, out);
    free_workspace(&ws);
    free(ys);
    return ok;
}

typedef struct {
    double initial_loss, final_loss, test_accuracy, seconds, worst_verify;
    int64_t steps;
} result;

static int train(mlp *net, const layout *lo, const dataset *train_set, const dataset *test_set, const settings *cfg,
                 result *res) {
    const int64_t M = cfg->batch, mine = lo->counts[lo->rank], first = lo->displs[lo->rank];
    workspace ws;
    memset(&ws, 0, sizeof ws);
    handle h = {NULL, {-1, -1}}, ref = {NULL, {-1, -1}};
    mlp *grad = (mlp *)calloc(1, sizeof(mlp)), *update = (mlp *)calloc(1, sizeof(mlp));
    mlp *check_update = (mlp *)calloc(1, sizeof(mlp));
    int64_t *order = (int64_t *)malloc(sizeof(int64_t) * (size_t)train_set->n);
    float *xb = (float *)malloc(sizeof(float) * (size_t)M * IN);  /* the whole global batch */
    float *rows_a = (float *)malloc(sizeof(float) * (size_t)M * IN), *rows_g = (float *)malloc(sizeof(float) * (size_t)M * HIDDEN);
    uint8_t *yb = (uint8_t *)malloc((size_t)M), *ys = (uint8_t *)malloc((size_t)M);
    int ok = 0;
    double test_loss = 0;
    uint64_t key = next_u64() >> 2; /* keys of the sampled labels, the same on every rank */
    res->worst_verify = 0;
    res->steps = 0;
    if (!grad || !update || !check_update || !order || !xb || !rows_a || !rows_g || !yb || !ys ||
        !alloc_workspace(&ws, mine > 0 ? mine : 1) || !open_handle(&h, cfg->damping))
        goto done;
    if (lo->rank == 0 && cfg->verify > 0 && !open_handle(&ref, cfg->damping)) goto done;
    evaluate(net, train_set, &res->initial_loss, &res->test_accuracy);
    for (int64_t i = 0; i < train_set->n; i++) order[i] = i;
    double seconds = 0;
    for (int epoch = 1; epoch <= cfg->epochs; epoch++) {
        for (int64_t i = train_set->n - 1; i > 0; i--) { /* the same shuffle on every rank */
            int64_t j = (int64_t)(next_u64() % (uint64_t)(i + 1)), t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
        double start = MPI_Wtime(), epoch_loss = 0;
        int64_t steps = 0;
        for (int64_t s = 0; s + M <= train_set->n; s += M, steps++, res->steps++) {
            for (int64_t i = 0; i < M; i++) {
                memcpy(xb + i * IN, train_set->images + order[s + i] * IN, sizeof(float) * IN);
                yb[i] = train_set->labels[order[s + i]];
            }
            const float *x = xb + first * IN;
            const int refresh = res->steps % cfg->update_freq == 0;
            const uint64_t step_key = key + (uint64_t)(res->steps * M);
            double failures = 0, dots = 0;
            ws.m = mine;
            forward(net, x, mine, &ws);
            /* Curvature rows: from sampled labels (true Fisher) or from the real ones (empirical). */
            for (int pass = 0; pass < 2; pass++) {
                const int curvature = refresh && (pass == 0) == (cfg->sampled != 0);
                if (pass == 0 && !cfg->sampled) continue;
                if (pass == 0) {
                    sample_labels(&ws, step_key + (uint64_t)first, ys);
                    backward(net, ys, &ws, M);
                } else {
                    double part = backward(net, yb + first, &ws, M), total = 0;
                    MPI_Allreduce(&part, &total, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
                    epoch_loss += total;
                }
                if (!curvature) continue;
                for (int l = 0; l < LAYERS; l++) {
                    const int owner = lo->owners[l];
                    gather_rows(lo, owner, layer_inputs(&ws, x, l), layer_in[l], rows_a);
                    gather_rows(lo, owner, layer_grads(&ws, l), layer_out[l], rows_g);
                    if (lo->rank == owner && failures == 0 &&
                        !check(h.p, tengrad_update_curvature(h.p, h.id[l], M, rows_a, rows_g, (float)M), "update_curvature"))
                        failures = 1;
                }
            }
            /* Mean gradient of the global batch: local parts summed on each layer's owner. */
            gradients(x, &ws, grad);
            if (res->steps == cfg->fail_at && lo->rank == lo->size - 1) grad->w1[0] = NAN; /* --fail-at */
            for (int l = 0; l < LAYERS; l++) {
                const int owner = lo->owners[l];
                float *g = layer_params(grad, l), *u = layer_params(update, l);
                MPI_Reduce(lo->rank == owner ? MPI_IN_PLACE : g, lo->rank == owner ? g : NULL, (int)layer_size(l),
                           MPI_FLOAT, MPI_SUM, owner, MPI_COMM_WORLD);
                if (lo->rank == owner) {
                    tengrad_layer_stats stats;
                    memset(&stats, 0, sizeof stats);
                    stats.size = sizeof stats;
                    float *b = g + layer_out[l] * layer_in[l], *ub = u + layer_out[l] * layer_in[l];
                    if (failures == 0 && check(h.p, tengrad_precondition(h.p, h.id[l], g, b, u, ub), "precondition") &&
                        check(h.p, tengrad_get_layer_stats(h.p, h.id[l], &stats), "layer stats"))
                        dots += stats.update_dot_grad;
                    else
                        failures = 1, memset(u, 0, sizeof(float) * (size_t)layer_size(l));
                }
                MPI_Bcast(u, (int)layer_size(l), MPI_FLOAT, owner, MPI_COMM_WORLD);
            }
            double summary[2] = {failures, dots}, global[2];
            MPI_Allreduce(summary, global, 2, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
            if (global[0] != 0) {
                fprintf(stderr, "rank %d: step %lld failed on %g rank(s); weights unchanged, stopping\n", lo->rank,
                        (long long)res->steps, global[0]);
                goto done;
            }
            double nu = 1;  /* the global sum's KL clipping, by the library's formula */
            if (cfg->kl_clip > 0 && tengrad_kl_clip_from_sum(cfg->lr, cfg->kl_clip, global[1], &nu) != TENGRAD_OK) nu = 1;
            if (lo->rank == 0 && res->steps < cfg->verify) {
                if (!reference_update(&ref, net, xb, yb, M, refresh, cfg->sampled, step_key, cfg, check_update)) goto done;
                double diff = 0, norm = 0;
                const float *u = (const float *)update, *r = (const float *)check_update;
                for (size_t i = 0; i < sizeof(mlp) / sizeof(float); i++) {
                    double d = (double)u[i] * nu - (double)r[i];
                    diff += d * d;
                    norm += (double)r[i] * r[i];
                }
                double rel = sqrt(diff / (norm > 0 ? norm : 1));
                printf("  verify step %lld (%s, nu %.3f): distributed vs single-process update, relative difference %.2e\n",
                       (long long)res->steps, refresh ? "refresh" : "reuse", nu, rel);
                if (rel > res->worst_verify) res->worst_verify = rel;
            }
            axpy_model(net, -cfg->lr * (float)nu, update);
        }
        seconds += MPI_Wtime() - start;
        evaluate(net, test_set, &test_loss, &res->test_accuracy);
        if (lo->rank == 0)
            printf("  epoch %2d  train loss %.4f  test loss %.4f  test accuracy %.2f%%  (%.1f s, %.2f ms/step)\n", epoch,
                   epoch_loss / (double)(steps > 0 ? steps : 1), test_loss, 100 * res->test_accuracy, seconds,
                   1e3 * seconds / (double)(res->steps > 0 ? res->steps : 1));
        fflush(stdout);
    }
    evaluate(net, train_set, &res->final_loss, &test_loss);
    res->seconds = seconds;
    ok = 1;
done:
    free_workspace(&ws);
    tengrad_destroy(h.p);
    tengrad_destroy(ref.p);
    free(grad); free(update); free(check_update); free(order); free(xb); free(rows_a); free(rows_g); free(yb); free(ys);
    return ok;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    layout lo;
    MPI_Comm_rank(MPI_COMM_WORLD, &lo.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &lo.size);
    const char *data = NULL;
    settings cfg = {1, 1, 0, 1, -1, 128, 0.2f, 1.0, 1e-2};
    int64_t train_limit = 0, test_limit = 0;
    int check_loss = 0, bad = 0;
    for (int i = 1; i < argc && !bad; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--check")) { check_loss = 1; continue; }
        if (!v) { bad = 1; break; }
        i++;
        long long n = 0;
        double x = 0;
        int ok = 1;
        if (!strcmp(a, "--data")) data = v;
        else if (!strcmp(a, "--epochs")) { ok = parse_integer(a, v, 1, 100000, &n); cfg.epochs = (int)n; }
        else if (!strcmp(a, "--batch")) { ok = parse_integer(a, v, 1, 1 << 20, &n); cfg.batch = n; }
        else if (!strcmp(a, "--lr")) { ok = parse_real(a, v, 0, 1e6, &x); cfg.lr = (float)x; }
        else if (!strcmp(a, "--damping")) { ok = parse_real(a, v, 1e-30, 1e30, &x); cfg.damping = x; }
        else if (!strcmp(a, "--kl-clip")) { ok = parse_real(a, v, 0, 1e30, &x); cfg.kl_clip = x; }
        else if (!strcmp(a, "--update-freq")) { ok = parse_integer(a, v, 1, 1000000, &n); cfg.update_freq = (int)n; }
        else if (!strcmp(a, "--verify")) { ok = parse_integer(a, v, 0, 1000000, &n); cfg.verify = (int)n; }
        else if (!strcmp(a, "--fail-at")) { ok = parse_integer(a, v, -1, INT64_MAX, &n); cfg.fail_at = n; }
        else if (!strcmp(a, "--train-limit")) { ok = parse_integer(a, v, 0, INT64_MAX, &n); train_limit = n; }
        else if (!strcmp(a, "--test-limit")) { ok = parse_integer(a, v, 0, INT64_MAX, &n); test_limit = n; }
        else if (!strcmp(a, "--seed")) { ok = parse_integer(a, v, 0, INT64_MAX, &n); rng_state = (uint64_t)n; }
        else if (!strcmp(a, "--fisher") && (!strcmp(v, "sampled") || !strcmp(v, "empirical"))) cfg.sampled = !strcmp(v, "sampled");
        else bad = 1;
        if (!ok) bad = 1;
    }
    if (bad || !data || cfg.epochs < 1 || cfg.batch < lo.size || cfg.update_freq < 1 || lo.size > 64) {
        if (lo.rank == 0)
            fprintf(stderr, "usage: mpirun -np P (P <= 64) %s --data DIR [--epochs N] [--batch M >= P] [--lr X]\n"
                            "          [--damping X] [--kl-clip X] [--fisher sampled|empirical] [--update-freq N]\n"
                            "          [--train-limit N] [--test-limit N] [--seed S] [--verify K] [--check]\n", argv[0]);
        MPI_Finalize();
        return 2;
    }
    dataset train_set = {NULL, NULL, 0}, test_set = {NULL, NULL, 0};
    int loaded = load(data, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", train_limit, &train_set) &&
                 load(data, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", test_limit, &test_set);
    int all_loaded = 0;
    MPI_Allreduce(&loaded, &all_loaded, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (!all_loaded) { MPI_Finalize(); return 1; }
    if (cfg.batch > train_set.n) cfg.batch = train_set.n;
    for (int r = 0; r <= lo.size; r++) lo.displs[r] = (int)(cfg.batch * r / lo.size);
    for (int r = 0; r < lo.size; r++) lo.counts[r] = lo.displs[r + 1] - lo.displs[r];
    if (!owner_map(lo.size, lo.owners)) {
        fprintf(stderr, "rank %d: owner assignment failed\n", lo.rank);
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    if (lo.rank == 0) {
        printf("Fashion-MNIST: %lld training and %lld test images; MLP 784-128-10 on %d MPI ranks, global batch %lld "
               "(rank 0: %d rows), %d epochs\n", (long long)train_set.n, (long long)test_set.n, lo.size,
               (long long)cfg.batch, lo.counts[0], cfg.epochs);
        printf("TENGraD: %s Fisher, refresh every %d steps, lr %g, damping %g, KL clip %g; owners: layer 1 -> rank %d, "
               "layer 2 -> rank %d\n", cfg.sampled ? "sampled-label" : "empirical", cfg.update_freq, cfg.lr, cfg.damping,
               cfg.kl_clip, lo.owners[0], lo.owners[1]);
    }
    mlp *net = (mlp *)malloc(sizeof(mlp));
    if (!net) { MPI_Abort(MPI_COMM_WORLD, 1); }
    init_mlp(net);
    result res;
    int ok = train(net, &lo, &train_set, &test_set, &cfg, &res);
    int all_ok = 0;
    MPI_Allreduce(&ok, &all_ok, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    int status = all_ok ? 0 : 1;
    if (all_ok) {
        /* Every rank applied the same broadcast updates: the weights must agree bitwise. */
        mlp *root = (mlp *)malloc(sizeof(mlp));
        memcpy(root, net, sizeof(mlp));
        MPI_Bcast(root, (int)(sizeof(mlp) / sizeof(float)), MPI_FLOAT, 0, MPI_COMM_WORLD);
        int same = memcmp(root, net, sizeof(mlp)) == 0, all_same = 0;
        MPI_Allreduce(&same, &all_same, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
        free(root);
        if (lo.rank == 0) {
            printf("\n%d ranks: training loss %.4f -> %.4f, test accuracy %.2f%%, %.2f s, %.2f ms/step; weights "
                   "identical on all ranks: %s\n", lo.size, res.initial_loss, res.final_loss, 100 * res.test_accuracy,
                   res.seconds, 1e3 * res.seconds / (double)(res.steps > 0 ? res.steps : 1), all_same ? "yes" : "NO");
            if (cfg.verify > 0)
                printf("largest relative difference from the single-process update over %d verified steps: %.2e "
                       "(limit 1e-4)\n", cfg.verify, res.worst_verify);
        }
        if (!all_same || res.worst_verify > 1e-4) status = 1;
        if (check_loss && !(res.final_loss < res.initial_loss)) {
            if (lo.rank == 0) fprintf(stderr, "check failed: the training loss did not fall\n");
            status = 1;
        }
    }
    free(net);
    free(train_set.images); free(train_set.labels); free(test_set.images); free(test_set.labels);
    MPI_Finalize();
    return status;
}
