/*
 * The 784-128-10 ReLU MLP, Fashion-MNIST loading and the numerics shared by the C trainers
 * (mlp.c: one process; mlp_mpi.c: data-parallel under MPI). Forward and backward passes are cblas
 * GEMMs. Compiles as C11 and as C++17.
 */
#ifndef TENGRAD_EXAMPLE_MLP_COMMON_H
#define TENGRAD_EXAMPLE_MLP_COMMON_H

#include <stdint.h>

#include "tengrad.h"

#ifdef __cplusplus
extern "C" {
#endif

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

/* Loads `limit` (0: all) images and labels of an IDX pair from `dir`, normalized. */
int load(const char *dir, const char *images_name, const char *labels_name, int64_t limit, dataset *out);

extern uint64_t rng_state;  /* splitmix64 state of init_mlp and the shuffles */
uint64_t next_u64(void);
float uniform(void);        /* in [0, 1) */

void init_mlp(mlp *net);    /* PyTorch's default initialization */
int alloc_workspace(workspace *ws, int64_t m);
void free_workspace(workspace *ws);

/* Forward pass of m samples; z2 receives the logits. */
void forward(const mlp *net, const float *x, int64_t m, workspace *ws);

/* Cross-entropy of ws->m samples divided by `mean_over` (the batch, or the global batch of which
   these samples are a part); dz2 receives d loss / d logits ((p − y)/mean_over), dz1 the gradient
   with respect to the first layer's outputs. Returns that loss. */
double backward(const mlp *net, const uint8_t *y, workspace *ws, int64_t mean_over);

/* Gradients of the loss backward() formed: dW = dZᵀ X, db = Σ_i dZ_i. */
void gradients(const float *x, const workspace *ws, mlp *grad);

void axpy_model(mlp *net, float alpha, const mlp *step); /* net += alpha · step */

/* Command-line numbers, strictly: the whole of `text` is one number within [lo, hi] (a real one
   also finite). Return 1 and set *out, or print "<option>: ..." to stderr and return 0. */
int parse_integer(const char *option, const char *text, long long lo, long long hi, long long *out);
int parse_real(const char *option, const char *text, double lo, double hi, double *out);

/* Mean loss and accuracy over a data set, in batches of 1000. */
void evaluate(const mlp *net, const dataset *d, double *loss, double *accuracy);

double now(void); /* wall seconds */

/* Labels drawn from the model's own predictive distribution softmax(z2), for the true Fisher;
   sample i's draw depends only on key + i, so a batch split across processes draws alike. */
void sample_labels(const workspace *ws, uint64_t key, uint8_t *out);

/* 1 if s is TENGRAD_OK, else prints what failed and returns 0. */
int check(tengrad_preconditioner *p, tengrad_status s, const char *what);

#ifdef __cplusplus
}
#endif

#endif
