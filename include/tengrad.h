/*
 * tengrad.h — C interface of TENGraD, exact natural-gradient preconditioning.
 *
 * TENGraD (Soori et al., 2021) preconditions each layer's gradient with the inverse of that layer's
 * exact, damped Fisher block, (F + λI)^-1, through the Woodbury identity: the only matrix ever
 * factorized is m×m, m = the number of samples in the batch. This header is the authority for the
 * C ABI of libtengrad.so; it is C11 and C++ clean and uses only <stdint.h>/<stddef.h> types.
 *
 * Mathematics (per layer, batch of m samples, s = grad_scale, λ = damping):
 *   per-sample gradient   u_i = s · g_i ⊗ ã_i    (linear; ã_i = [a_i; 1] when the layer has a bias)
 *   Fisher block          F   = (1/m) Σ_i u_i u_iᵀ = (1/m) U Uᵀ
 *   update                (F + λI)^-1 v = (1/λ) (v − U (UᵀU + mλI)^-1 Uᵀ v)
 * The bias, when present, is part of the same ("joint") block as the weight: its gradient is the
 * last input column of ones. U is never formed; UᵀU is the Hadamard product of the Gram matrices of
 * the inputs and of the output gradients, built in float64 and factorized by Cholesky.
 *
 * Conventions, for every function below:
 *  - Arrays are dense, C-contiguous (row-major), float32, owned by the caller. The library reads
 *    (or writes) them only during the call and keeps no pointer to them.
 *  - Layouts. linear: activations [batch][in], output_grads [batch][out], weight [out][in],
 *    bias [out]. conv2d: activations [batch][C_in][H][W], output_grads [batch][C_out][H_out][W_out],
 *    weight [C_out][C_in/groups][kh][kw], bias [C_out];
 *    H_out = (H + 2*pad_h - dil_h*(kh-1) - 1)/stride_h + 1, likewise W_out.
 *  - Bias pointers are NULL exactly when the layer has no bias.
 *  - Every fallible function returns a tengrad_status. Out-parameters are written only on
 *    success; a call that fails leaves the handle exactly as it was (snapshots, settings, layers),
 *    and tengrad_last_error() then says why.
 *  - Threading: a handle is used by one thread at a time (calls on one handle must not overlap);
 *    distinct handles are fully independent and may be used from different threads at once.
 *    The library keeps no thread-local state and no global state but a lock over changes to
 *    OpenBLAS's process-wide thread count (see tengrad_set_blas_threads). A call that overlaps
 *    another call on the same handle is detected (one atomic flag per handle) and refused with
 *    TENGRAD_ERROR_STATE, changing nothing and not touching the handle's message; while the other
 *    call runs, tengrad_last_error returns the static text "handle busy (concurrent call)"
 *    instead of the message that call may be replacing. tengrad_destroy is not guarded: this is
 *    a safety net, not a licence to share handles. tengrad_last_error belongs to the thread that
 *    made the last call, between that call's return and its next call on the handle.
 *  - BLAS threading is OpenBLAS's own (OPENBLAS_NUM_THREADS), or per handle with
 *    tengrad_set_blas_threads.
 */
#ifndef TENGRAD_H
#define TENGRAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__) || defined(__clang__)
#define TENGRAD_NODISCARD __attribute__((warn_unused_result))
#else
#define TENGRAD_NODISCARD
#endif

/* ---- Version ---------------------------------------------------------------------------- */

#define TENGRAD_VERSION_MAJOR 0
#define TENGRAD_VERSION_MINOR 5
#define TENGRAD_VERSION_PATCH 0
#define TENGRAD_VERSION_NUMBER \
    (TENGRAD_VERSION_MAJOR * 10000 + TENGRAD_VERSION_MINOR * 100 + TENGRAD_VERSION_PATCH)

/* Version of the library actually loaded: MAJOR*10000 + MINOR*100 + PATCH. Compare with
   TENGRAD_VERSION_NUMBER to detect a header/library mismatch. */
int32_t tengrad_version_number(void);

/* ---- Status ----------------------------------------------------------------------------- */

typedef int32_t tengrad_status;
enum {
    TENGRAD_OK = 0,
    TENGRAD_ERROR_INVALID_ARGUMENT = 1, /* NULL pointer, non-positive size, unknown layer id, bad value */
    TENGRAD_ERROR_SHAPE = 2,            /* sizes inconsistent with the layer, or size overflow */
    TENGRAD_ERROR_NOT_FINITE = 3,       /* NaN or Inf in an input; nothing was changed */
    TENGRAD_ERROR_NUMERICAL = 4,        /* factorization failed even with jitter, or overflow inside */
    TENGRAD_ERROR_OUT_OF_MEMORY = 5,    /* allocation failed or the memory limit would be exceeded */
    TENGRAD_ERROR_STATE = 6,            /* call out of order, e.g. precondition before any curvature */
    TENGRAD_ERROR_CORRUPT = 7           /* serialized state is damaged or of another format */
};

/* Static English text for a status ("unknown status" for values outside the enum); never NULL. */
const char *tengrad_status_string(tengrad_status status);

/* ---- BLAS and CPU ----------------------------------------------------------------------- */

/* What BLAS the library runs on and how well its kernels fit the CPU. Process-wide (no handle).
   The library links one OpenBLAS build: the system's ("system") or PyPI's scipy-openblas32
   ("scipy-openblas32", a current OpenBLAS; the Python wheel's and `make build`'s default). An
   OpenBLAS older than the CPU does not recognize it and runs generic kernels: on an AVX-512 CPU,
   Debian 12's 0.3.21 runs its SSE3 "Prescott" kernels, sgemm 3-5x slower. generic_fallback says
   so; the remedies are the newer build or, for an older build, OPENBLAS_CORETYPE set by the user
   before the process starts (the library never sets it). Strings are NUL-terminated, truncated
   to fit. */
enum {
    TENGRAD_ISA_UNKNOWN = 0, /* not x86-64, or a kernel set this library does not list */
    TENGRAD_ISA_SSE = 1,
    TENGRAD_ISA_AVX = 2,
    TENGRAD_ISA_AVX2 = 3,
    TENGRAD_ISA_AVX512 = 4
};

typedef struct tengrad_blas_info {
    size_t size;              /* in: sizeof(tengrad_blas_info) */
    char library[16];         /* "OpenBLAS" */
    char build[32];           /* "system" or "scipy-openblas32" */
    char version[32];         /* as OpenBLAS reports it, e.g. "0.3.34.481.3" */
    char core[32];            /* the kernel set in use, e.g. "SkylakeX", "Haswell", "Prescott" */
    char config[160];         /* openblas_get_config(), verbatim */
    int32_t threads;          /* OpenBLAS's thread count now */
    int32_t core_isa;         /* TENGRAD_ISA_*: what the kernels of `core` are written for */
    int32_t cpu_isa;          /* TENGRAD_ISA_*: the widest the CPU and the OS support */
    int32_t generic_fallback; /* 1: core_isa is below AVX2 on a CPU with AVX2 or AVX-512 */
    char cpu_model[64];       /* the CPU's brand string ("" where unknown) */
    int32_t cpu_family;       /* x86 family and model numbers (0 where unknown) */
    int32_t cpu_model_number;
} tengrad_blas_info;

/* Fills *info (set info->size first; a larger size from a later header is accepted and only
   this version's fields are written). TENGRAD_ERROR_INVALID_ARGUMENT for NULL or a size smaller
   than this header's struct. */
TENGRAD_NODISCARD tengrad_status tengrad_get_blas_info(tengrad_blas_info *info);

/* ---- Handle ----------------------------------------------------------------------------- */

typedef struct tengrad_preconditioner tengrad_preconditioner;

/* Create a preconditioner with no layers; damping 0.1. *out receives the handle.
   Release it with tengrad_destroy(). */
TENGRAD_NODISCARD tengrad_status tengrad_create(tengrad_preconditioner **out);

/* Release the handle and everything it owns. NULL is a no-op. */
void tengrad_destroy(tengrad_preconditioner *p);

/* Message describing the outcome of the last fallible call on p ("" after a success).
   The text is owned by p and valid until the next call on p. p == NULL gives a static text;
   while another call is running on p, a static "handle busy (concurrent call)". */
const char *tengrad_last_error(const tengrad_preconditioner *p);

/* ---- Settings --------------------------------------------------------------------------- */

/* Damping λ of the damped block F + λI, for every layer. Finite and > 0; default 0.1.
   λ is in the units of the Fisher, i.e. of squared per-sample gradients. Changing it keeps every
   snapshot: the next precondition re-factorizes UᵀU + mλI from the kept Gram, without new data.
   A schedule is the caller calling this between steps. */
TENGRAD_NODISCARD tengrad_status tengrad_set_damping(tengrad_preconditioner *p, double damping);
TENGRAD_NODISCARD tengrad_status tengrad_get_damping(const tengrad_preconditioner *p, double *out);

/* Cap on the bytes the handle allocates (snapshots plus workspaces); 0 means no cap (default).
   A call that would exceed it fails with TENGRAD_ERROR_OUT_OF_MEMORY and changes nothing. */
TENGRAD_NODISCARD tengrad_status tengrad_set_memory_limit(tengrad_preconditioner *p, int64_t bytes);
TENGRAD_NODISCARD tengrad_status tengrad_get_memory_limit(const tengrad_preconditioner *p,
                                                          int64_t *out);
/* Bytes the handle holds now (snapshots, their m×m systems, the shared workspace). */
TENGRAD_NODISCARD tengrad_status tengrad_get_memory_usage(const tengrad_preconditioner *p,
                                                          int64_t *out);

/* OpenBLAS threads for this handle's calls. 0 (default) leaves OpenBLAS's own setting
   (OPENBLAS_NUM_THREADS) alone; n in 1..1024 makes every call on this handle set OpenBLAS's
   process-wide thread count to n and restore the previous count on return (so concurrent calls
   on other handles may briefly see n, and their results may differ in the last bits; when the
   last of overlapping calls returns, the count is the one the first of them found). Not part of
   saved state (it belongs to the machine).
   Why: a host framework's own thread pool (PyTorch's OpenMP workers, for ~5 ms after each op)
   competes with OpenBLAS's pool for the cores; short calls made right after the host's parallel
   work (the reuse step) then run several times faster on one thread. See the README's "Threads". */
TENGRAD_NODISCARD tengrad_status tengrad_set_blas_threads(tengrad_preconditioner *p, int32_t threads);
TENGRAD_NODISCARD tengrad_status tengrad_get_blas_threads(const tengrad_preconditioner *p, int32_t *out);

enum { TENGRAD_CONV_AUTO = 0, TENGRAD_CONV_FACTORED = 1, TENGRAD_CONV_EXPLICIT = 2 };

/* ---- Layers ----------------------------------------------------------------------------- */

/* Register a linear layer y = W a (+ b), W [out_features][in_features]. *out_layer receives its id;
   ids are 0, 1, 2, ... in registration order. has_bias is 0 or 1. */
TENGRAD_NODISCARD tengrad_status tengrad_add_linear(tengrad_preconditioner *p, int64_t in_features,
                                                    int64_t out_features, int32_t has_bias,
                                                    int32_t *out_layer);

/* Every public struct starts with `size` (sizeof of the caller's header version). A struct the
   library reads (tengrad_conv2d_shape for tengrad_add_conv2d, tengrad_batch) must be at least this
   version's; a larger one (a newer header) is taken only when every byte past this version's
   struct is zero (new fields at their zero default), never with a setting silently ignored;
   sizes above 1024 are refused unread. A struct the library fills (tengrad_layer_stats,
   tengrad_snapshot_info, tengrad_blas_info, tengrad_get_conv2d_shape's) must be at least this
   version's; this version's fields are written, `size` included. Start from the _INIT macros.
   Changed in 0.5: tengrad_conv2d_shape and tengrad_layer_stats gained `size` (recompile). */
typedef struct tengrad_conv2d_shape {
    size_t size;
    int64_t in_channels, out_channels;
    int64_t in_height, in_width;
    int64_t kernel_height, kernel_width;
    int64_t stride_height, stride_width;
    int64_t padding_height, padding_width; /* zero padding, both sides */
    int64_t dilation_height, dilation_width;
    int64_t groups;
    int32_t has_bias;
} tengrad_conv2d_shape;

/* size set; stride, dilation and groups 1; no padding, no bias; channels, sizes and kernel to fill. */
#define TENGRAD_CONV2D_SHAPE_INIT { sizeof(tengrad_conv2d_shape), 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 0 }

/* Register a 2-D convolution (PyTorch's nn.Conv2d semantics; the shape is read during the call
   only). Every size must be positive except padding (>= 0); groups must divide both channel
   counts (groups == in_channels is depthwise); the dilated kernel must fit the padded input;
   has_bias is 0 or 1. An invalid shape is rejected with a message naming the field.
   The block is exact for any groups: the Gram of the layer is the sum of the per-group Grams. */
TENGRAD_NODISCARD tengrad_status tengrad_add_conv2d(tengrad_preconditioner *p,
                                                    const tengrad_conv2d_shape *shape,
                                                    int32_t *out_layer);

/* Register a per-feature scale and shift y = γ ∘ x̂ (+ β), γ and β of `features` numbers: the
   affine part of LayerNorm (has_bias 1) or RMSNorm (has_bias 0). Its batch calls take the
   normalized inputs x̂ as activations and dL/dy as output gradients, both [batch][features], or
   [batch][tokens][features] over sequences (masks and token modes as for a linear layer). The
   per-sample gradient is [Σ_t g_t ∘ x̂_t, Σ_t g_t]; the weight array is γ [features], the bias β.
   Its Gram is the explicit one and its snapshots keep the per-sample gradients unless set
   otherwise (both never larger than the batch). Since 0.5. */
TENGRAD_NODISCARD tengrad_status tengrad_add_affine(tengrad_preconditioner *p, int64_t features,
                                                    int32_t has_bias, int32_t *out_layer);

/* Register a lookup table y_t = W[id_t], W of [vocabulary][features] floats (nn.Embedding;
   1 ≤ vocabulary ≤ 2^24). Its batch calls take the token ids as activations, as floats
   ([batch][tokens]: integers in [0, vocabulary), exact in float32; anything else at a token the
   mask keeps is refused with
   TENGRAD_ERROR_INVALID_ARGUMENT and changes nothing), and dL/dy as output gradients
   ([batch][tokens][features]). The per-sample gradient holds, on row v, the sum of the output
   gradients of the sample's tokens with id v; its one-hots are never formed: the Gram counts the
   ids two samples share, weighted by their output-gradient products (a sort of the batch's ids),
   and the reuse products are a gather and a scatter-add, O(batch·tokens·features). Snapshots keep
   the raw batch unless set otherwise (U has vocabulary·features numbers per sample). A padding
   id (nn.Embedding's padding_idx) is the caller's to mask: zero its output gradients or pass a
   mask. No bias. Since 0.5. */
TENGRAD_NODISCARD tengrad_status tengrad_add_embedding(tengrad_preconditioner *p, int64_t vocabulary,
                                                       int64_t features, int32_t *out_layer);

/* How a convolution builds its m×m Gram; both are exact and agree to float32 rounding.
   TENGRAD_CONV_FACTORED: pairwise products of patches and of output gradients over output
     positions, ≈ groups·m²·L²·(P + C_out/groups + 1) flops (L = H_out·W_out,
     P = C_in/groups·kh·kw) — cheap when L is small;
   TENGRAD_CONV_EXPLICIT: per-sample gradients formed block by block and their Gram,
     ≈ 2·m·L·C_out·P + m²·C_out·(P + 1) flops — cheap when L is large.
   TENGRAD_CONV_AUTO (default) picks the one with fewer flops by these formulas; the layer's
   stats report the choice and both estimates. Workspaces are chunked over samples and output
   channels to stay within 64 MiB, or within what the memory limit leaves. Linear layers accept
   the setting too: it decides their Gram when they are called over tokens (T > 1, L = T above;
   see tengrad_update_curvature_tokens); with T = 1 the factored Gram is always used. */
TENGRAD_NODISCARD tengrad_status tengrad_set_conv_strategy(tengrad_preconditioner *p, int32_t layer,
                                                           int32_t strategy);

/* What a layer's curvature snapshot keeps for the reuse path (tengrad_precondition):
   TENGRAD_SNAPSHOT_RAW: copies of the batch (activations and output gradients),
     m·(inputs + outputs) floats per layer; each precondition recomputes Uᵀv and U x from them
     (a convolution unfolds the batch again: ≈ 4·m·L·C_out·(P + 1) flops);
   TENGRAD_SNAPSHOT_PER_SAMPLE: the per-sample gradients U themselves, m·(weight + bias) floats;
     each precondition is two matrix-vector products over U (≈ 4·m·(weight + bias) flops, memory-bound).
   TENGRAD_SNAPSHOT_AUTO (default) decides at each curvature update by a cost model: per-sample
     when two streaming passes over U cost less than the raw products (roughly L > 10 output
     positions; never for linear layers) and U fits the memory limit (with no limit set: at most
     1 GiB per layer); if U does not fit, raw. Both give the same update up to float32 rounding.
   The setting takes effect at the next curvature update (tengrad_update_curvature or
   tengrad_natural_gradient); forcing PER_SAMPLE when U does not fit the memory limit makes those
   calls fail with TENGRAD_ERROR_OUT_OF_MEMORY. Any layer kind accepts any setting. */
enum { TENGRAD_SNAPSHOT_AUTO = 0, TENGRAD_SNAPSHOT_RAW = 1, TENGRAD_SNAPSHOT_PER_SAMPLE = 2 };

TENGRAD_NODISCARD tengrad_status tengrad_set_snapshot_representation(tengrad_preconditioner *p,
                                                                     int32_t layer,
                                                                     int32_t representation);

/* Number of registered layers. */
TENGRAD_NODISCARD tengrad_status tengrad_layer_count(const tengrad_preconditioner *p, int32_t *out);

/* Shape of a registered layer (e.g. after loading state into a fresh handle). Asking for the
   shape of the other kind is TENGRAD_ERROR_INVALID_ARGUMENT. */
TENGRAD_NODISCARD tengrad_status tengrad_get_linear_shape(const tengrad_preconditioner *p, int32_t layer,
                                                          int64_t *in_features, int64_t *out_features,
                                                          int32_t *has_bias);
TENGRAD_NODISCARD tengrad_status tengrad_get_conv2d_shape(const tengrad_preconditioner *p, int32_t layer,
                                                          tengrad_conv2d_shape *out);

/* The arrays of a layer's calls, as the library sizes them — the one size authority (bindings
   ask instead of recomputing, e.g. a convolution's output size): one sample's (and token's)
   activations and output gradients without the batch and token axes, the weight and the bias,
   row-major. rank: dims used (1 to 4); bias_rank 0: no bias. */
typedef struct tengrad_layer_arrays {
    size_t size;               /* in: sizeof(tengrad_layer_arrays); out: the bytes written */
    int32_t activation_rank, output_grad_rank, weight_rank, bias_rank;
    int64_t activation_dims[4];
    int64_t output_grad_dims[4];
    int64_t weight_dims[4];
    int64_t bias_dims[4];
} tengrad_layer_arrays;

TENGRAD_NODISCARD tengrad_status tengrad_get_layer_arrays(const tengrad_preconditioner *p, int32_t layer,
                                                          tengrad_layer_arrays *out);

/* ---- Preconditioning -------------------------------------------------------------------- */

/* grad_scale s: the factor by which the caller's output gradients must be multiplied to give each
   sample's own gradient. A mean-reduced loss (PyTorch's default) hands each sample (1/m) of its
   gradient, so pass s = batch; a sum-reduced loss passes s = 1. Finite and > 0. */

/* ---- A batch, described once (recommended) ----------------------------------------------

   One struct carries what every batch-taking call needs; one entry point per operation takes it
   (the plain and _tokens calls below are thin wrappers kept for the 0.x versions).

     tengrad_batch b = TENGRAD_BATCH_INIT;     (size set, tokens = 1, no mask, grad_scale = 1)
     b.batch = m; b.activations = a; b.output_grads = g; b.grad_scale = (double)m;
     status = tengrad_update_curvature_v2(p, layer, &b);

   size: sizeof(tengrad_batch) of the caller's header. Smaller than this version's struct:
     TENGRAD_ERROR_INVALID_ARGUMENT. Larger (a newer header): accepted when every byte past the
     fields this library knows is zero (new fields at their zero default), refused otherwise, so
     a newer caller never has a setting silently ignored.
   batch:  m ≥ 1 samples (sequences).
   tokens: T ≥ 1 positions per sample for a linear layer over sequences (activations
     [batch][tokens][in], output_grads [batch][tokens][out]); 1 for a plain batch and for conv2d
     layers (whose positions are their output pixels). See "Linear layers over token sequences".
   mask: NULL, or [batch][tokens] bytes, 1 for a token and 0 for padding (other values refused).
   grad_scale: s, finite and > 0 (see above); a double here, used as the nearest float.
   The struct and the arrays are read during the call only. */
typedef struct tengrad_batch {
    size_t size;
    int64_t batch;
    int64_t tokens;
    const float *activations;
    const float *output_grads;
    const uint8_t *mask;
    double grad_scale;
} tengrad_batch;

#define TENGRAD_BATCH_INIT { sizeof(tengrad_batch), 0, 1, NULL, NULL, NULL, 1.0 }

/* tengrad_update_curvature, tengrad_natural_gradient and tengrad_per_sample_gradients (below) on
   a described batch, with or without tokens and mask. */
TENGRAD_NODISCARD tengrad_status tengrad_update_curvature_v2(tengrad_preconditioner *p, int32_t layer,
                                                             const tengrad_batch *batch);
TENGRAD_NODISCARD tengrad_status tengrad_natural_gradient_v2(tengrad_preconditioner *p, int32_t layer,
                                                             const tengrad_batch *batch,
                                                             float *weight_update, float *bias_update);
TENGRAD_NODISCARD tengrad_status tengrad_per_sample_gradients_v2(tengrad_preconditioner *p, int32_t layer,
                                                                 const tengrad_batch *batch,
                                                                 float *out_rows);

/* Take a curvature snapshot of this layer from a batch (replaces the previous one).
   The snapshot keeps the batch in one of two representations (see tengrad_set_snapshot_representation:
   copies of the activations and output gradients, or the per-sample gradients), their m×m Gram
   and the Cholesky factor of UᵀU + mλI: about m·(in + out) floats + 2·m² doubles for a linear layer. */
TENGRAD_NODISCARD tengrad_status tengrad_update_curvature(tengrad_preconditioner *p, int32_t layer,
                                                          int64_t batch, const float *activations,
                                                          const float *output_grads,
                                                          float grad_scale);

/* ---- Linear layers over token sequences ------------------------------------------------ */

/* A linear layer applied to sequences (PyTorch's nn.Linear on [batch, T, in] inputs, as in every
   transformer): activations [batch][tokens][in], output_grads [batch][tokens][out], row-major
   (batch-first). `tokens` T may differ between calls. The mask, if not NULL, is
   [batch][tokens] bytes, 1 for a token and 0 for padding; padding contributes nothing, whatever
   its activations and gradients hold (NaN included); a mask of all ones equals no mask. Values
   other than 0 and 1: TENGRAD_ERROR_INVALID_ARGUMENT.

   TENGRAD_TOKENS_PER_SEQUENCE (default): a sample is a sequence, its gradient the sum over its
     tokens u_i = s Σ_t g_it ã_itᵀ (s = grad_scale), and the block is the exact Fisher block of
     these per-sequence gradients: K_ij = s² Σ_{t,t'} (ã_it·ã_jt')(g_it·g_jt'). Both Gram strategies
     (factored over token pairs, ≈ m²T²(in + out) flops; explicit per-sample gradients,
     ≈ 2mT·in·out + m²·out·(in + 1)) and both snapshot representations apply, picked by the
     same cost models as for convolutions (L = T). tokens = 1 is the plain linear layer.
   TENGRAD_TOKENS_PER_TOKEN: every unmasked token is a sample (the "expand" view of KFAC
     libraries, for losses that are sums over tokens): the same as the plain calls on the
     unmasked tokens flattened into the batch (m = their number; grad_scale then makes token
     gradients out of the output gradients).
   The mode takes effect at the next curvature update; conv2d layers take only PER_SEQUENCE (and
   tokens = 1). tengrad_precondition applies whatever snapshot the layer holds. */
enum { TENGRAD_TOKENS_PER_SEQUENCE = 0, TENGRAD_TOKENS_PER_TOKEN = 1 };

TENGRAD_NODISCARD tengrad_status tengrad_set_token_mode(tengrad_preconditioner *p, int32_t layer, int32_t mode);
TENGRAD_NODISCARD tengrad_status tengrad_get_token_mode(const tengrad_preconditioner *p, int32_t layer,
                                                        int32_t *out_mode);

/* ---- Layer parameters (recommended) ----------------------------------------------------- */

/* Every per-layer setting through one pair of calls, keyed by TENGRAD_LAYER_PARAM_* (new knobs
   arrive as new keys, not new functions):
     TENGRAD_LAYER_PARAM_CONV_STRATEGY          TENGRAD_CONV_*      (tengrad_set_conv_strategy)
     TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION TENGRAD_SNAPSHOT_* (tengrad_set_snapshot_representation)
     TENGRAD_LAYER_PARAM_TOKEN_MODE             TENGRAD_TOKENS_*    (tengrad_set_token_mode)
     TENGRAD_LAYER_PARAM_DAMPING_MODE           TENGRAD_DAMPING_*
   TENGRAD_DAMPING_ABSOLUTE (default): the layer's block is F + λI (F + λE with a base), λ as set
   by tengrad_set_damping. TENGRAD_DAMPING_RELATIVE: λ is relative to the batch block's average
   nonzero eigenvalue — the layer uses λ · tr(F)/min(m, d) (with a base, of E⁻¹F), computed at
   each refresh from the snapshot's Gram (λ itself when F is zero), so one λ fits layers and
   losses of any scale (docs/DESIGN.md §16). Takes effect at the next curvature update; the layer stats' damping
   reports the λ in use.
   An unknown key or a value outside its set is TENGRAD_ERROR_INVALID_ARGUMENT and changes
   nothing; so is a value the layer's kind does not take (PER_TOKEN on a conv2d layer). The
   single-setting calls above stay, as thin wrappers, for the 0.x versions. */
enum {
    TENGRAD_LAYER_PARAM_CONV_STRATEGY = 1,
    TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION = 2,
    TENGRAD_LAYER_PARAM_TOKEN_MODE = 3,
    TENGRAD_LAYER_PARAM_DAMPING_MODE = 4
};
enum { TENGRAD_DAMPING_ABSOLUTE = 0, TENGRAD_DAMPING_RELATIVE = 1 };

TENGRAD_NODISCARD tengrad_status tengrad_set_layer_param(tengrad_preconditioner *p, int32_t layer,
                                                         int32_t param, int64_t value);
TENGRAD_NODISCARD tengrad_status tengrad_get_layer_param(const tengrad_preconditioner *p, int32_t layer,
                                                         int32_t param, int64_t *out_value);

/* ---- Diagonal base ------------------------------------------------------------------------ */

/* A layer's block becomes F + λE instead of F + λI: E = diag(e), one number per parameter — the
   weight in weight_grad's layout, the bias (exactly when the layer has one) in bias_grad's — so
   that directions one batch does not see get curvature from elsewhere, e.g. a running average of
   squared gradients normalized to mean 1 (docs/DESIGN.md §13). Still one m×m system per layer:
     (F + λE)⁻¹ v = (1/λ) E⁻¹ (v − U x),  x = (UᵀE⁻¹U + mλI)⁻¹ UᵀE⁻¹ v  (U: per-sample gradients),
   and λ remains a shift (tengrad_set_damping re-factorizes the kept Gram). e = 1 everywhere is
   the plain block. Every e must be a normal positive float (2⁻¹²⁶ ≤ e < ∞):
   TENGRAD_ERROR_NOT_FINITE for NaN or Inf, TENGRAD_ERROR_INVALID_ARGUMENT for a smaller entry, a
   missing or unexpected bias_base; either changes nothing. weight_base NULL (and bias_base NULL)
   clears the base. The library copies e (2 floats per parameter, counted against the memory
   limit). It takes effect at the next curvature update (the current snapshot keeps the base it
   was taken with; saved state keeps both). A layer with a base takes its Gram by the explicit
   strategy (embeddings: their sparse Gram), whatever its strategy setting.
   tengrad_get_layer_base: 1 when a base is set for the next snapshot, else 0. */
TENGRAD_NODISCARD tengrad_status tengrad_set_layer_base(tengrad_preconditioner *p, int32_t layer,
                                                        const float *weight_base, const float *bias_base);
TENGRAD_NODISCARD tengrad_status tengrad_get_layer_base(const tengrad_preconditioner *p, int32_t layer,
                                                        int32_t *out_has_base);

/* tengrad_update_curvature and tengrad_natural_gradient over sequences (see above). */
TENGRAD_NODISCARD tengrad_status tengrad_update_curvature_tokens(tengrad_preconditioner *p, int32_t layer,
                                                                 int64_t batch, int64_t tokens,
                                                                 const float *activations,
                                                                 const float *output_grads,
                                                                 const uint8_t *mask, float grad_scale);
TENGRAD_NODISCARD tengrad_status tengrad_natural_gradient_tokens(tengrad_preconditioner *p, int32_t layer,
                                                                 int64_t batch, int64_t tokens,
                                                                 const float *activations,
                                                                 const float *output_grads,
                                                                 const uint8_t *mask, float grad_scale,
                                                                 float *weight_update, float *bias_update);

/* Per-sample gradients as data, for moving a snapshot between processes (data-parallel training:
   a layer's owner gathers its rows from every worker; docs/DESIGN.md §11). Rows are smaller than
   the batch they come from when a layer has many output positions (a convolution's d = weight +
   bias numbers against inputs + outputs per sample).

   tengrad_per_sample_gradients writes out_rows[batch][d], d = weight + bias numbers of the layer:
   row i is grad_scale × sample i's gradient, the weight part in weight_grad's layout followed by
   the bias part. No state changes (the handle's workspace may grow). out_rows must not overlap
   activations or output_grads (TENGRAD_ERROR_INVALID_ARGUMENT); on failure its contents are
   unspecified.

   tengrad_update_curvature_from_gradients takes a curvature snapshot from such rows (batch × d,
   already scaled), replacing the previous one: the same snapshot tengrad_update_curvature takes
   from the batch the rows came from, up to float32 rounding. It keeps the rows (per-sample
   representation, whatever tengrad_set_snapshot_representation says): m·d floats + 2·m² doubles.
   Rows with NaN or Inf: TENGRAD_ERROR_NOT_FINITE, nothing changes. */
TENGRAD_NODISCARD tengrad_status tengrad_per_sample_gradients(tengrad_preconditioner *p, int32_t layer,
                                                              int64_t batch, const float *activations,
                                                              const float *output_grads, float grad_scale,
                                                              float *out_rows);
/* tengrad_per_sample_gradients of sequences (a linear layer over tokens in per-sequence mode; see
   tengrad_update_curvature_tokens): row i is sequence i's gradient s Σ_t mask_it g_it ã_itᵀ, one
   row of d numbers per sequence whatever T — processes with different sequence lengths send rows
   of one width. A per-token layer refuses (TENGRAD_ERROR_INVALID_ARGUMENT): send its tokens. */
TENGRAD_NODISCARD tengrad_status tengrad_per_sample_gradients_tokens(tengrad_preconditioner *p, int32_t layer,
                                                                     int64_t batch, int64_t tokens,
                                                                     const float *activations,
                                                                     const float *output_grads,
                                                                     const uint8_t *mask, float grad_scale,
                                                                     float *out_rows);
TENGRAD_NODISCARD tengrad_status tengrad_update_curvature_from_gradients(tengrad_preconditioner *p,
                                                                         int32_t layer, int64_t batch,
                                                                         const float *per_sample_gradients);

/* update = (F + λI)^-1 grad, with F from the layer's current snapshot (reuse path: sampled-label
   Fisher, or curvature refreshed every T steps). weight_update may be the same pointer as
   weight_grad and bias_update as bias_grad (in place); any other overlap (bias_update with
   weight_update, an update with part of a gradient or with the other gradient) is refused with
   TENGRAD_ERROR_INVALID_ARGUMENT. TENGRAD_ERROR_STATE when the layer has no snapshot yet. */
TENGRAD_NODISCARD tengrad_status tengrad_precondition(tengrad_preconditioner *p, int32_t layer,
                                                      const float *weight_grad,
                                                      const float *bias_grad, float *weight_update,
                                                      float *bias_update);

/* tengrad_precondition in two phases, for a step over many layers that must write nothing until
   every layer succeeded and that scales all updates by one factor known only then (KL clipping's
   ν from tengrad_kl_clip_factor): prepare every layer, compute the factor, finish every layer —
   in place into the gradients, with no copy.
   tengrad_precondition_prepare does all that can fail (the arguments, NaN/Inf in the gradient,
   Uᵀ·grad, the solve, the float32 bound) and records the layer's ⟨update, grad⟩ for
   tengrad_kl_clip_factor; it writes no output, and on failure nothing changes. The layer keeps
   m doubles for it (allocated at its first prepare, reused by later ones). A second prepare of
   the layer replaces the first; a curvature update or tengrad_load_state drops it.
   tengrad_precondition_finish writes scale · (F + λI)^-1 grad (scale finite; 1 gives
   tengrad_precondition's bits) from the same gradient arrays, unchanged since the prepare (other
   layers' calls in between are fine). The outputs follow tengrad_precondition's rules (in place
   or disjoint); the damping is the prepare's (a new one applies from the next prepare). It fails
   only with TENGRAD_ERROR_STATE (no prepare since the last finish or since the snapshot
   changed), TENGRAD_ERROR_NUMERICAL (|scale| > 1 would overflow float32), on bad arguments, or
   with TENGRAD_ERROR_OUT_OF_MEMORY when the memory limit was lowered between the phases; the
   prepare is then kept. The recorded ⟨update, grad⟩ stays the unscaled update's (as
   tengrad_precondition records it), so tengrad_kl_clip_factor gives the same ν. */
TENGRAD_NODISCARD tengrad_status tengrad_precondition_prepare(tengrad_preconditioner *p, int32_t layer,
                                                              const float *weight_grad,
                                                              const float *bias_grad);
TENGRAD_NODISCARD tengrad_status tengrad_precondition_finish(tengrad_preconditioner *p, int32_t layer,
                                                             const float *weight_grad,
                                                             const float *bias_grad, double scale,
                                                             float *weight_update, float *bias_update);

/* Empirical Fisher in one call: snapshot from this batch, and update = (F + λI)^-1 of this
   batch's mean gradient (the mean of the per-sample gradients defined by the same inputs).
   The update buffers must not overlap activations, output_grads or each other
   (TENGRAD_ERROR_INVALID_ARGUMENT).
   Computed as U (UᵀU + mλI)^-1 1: no gradient has to be passed and no Uᵀv product is formed.
   The snapshot is kept, so later tengrad_precondition calls reuse it. */
TENGRAD_NODISCARD tengrad_status tengrad_natural_gradient(tengrad_preconditioner *p, int32_t layer,
                                                          int64_t batch, const float *activations,
                                                          const float *output_grads,
                                                          float grad_scale, float *weight_update,
                                                          float *bias_update);

/* ---- State ---------------------------------------------------------------------------- */

/* Save everything a resumed run needs for bit-identical updates: settings (damping, memory
   limit, conv strategies), layers and their shapes, each layer's curvature snapshot (batch
   copies, Gram, Cholesky factor, diagonal base) and last ⟨update, grad⟩. Size query then fill: with
   buffer == NULL, *size receives the bytes needed; otherwise up to capacity bytes are written
   and *size receives the bytes written (TENGRAD_ERROR_SHAPE if capacity is too small).
   Format: magic "TENGRAD\x1a", u32 version (4), explicit little-endian fields, no pointers,
   XXH64 checksum of all preceding bytes last. The blob is portable across machines.
   Version 2 added the snapshot representation, version 3 a snapshot's token count (sequence
   layers), version 4 diagonal bases; blobs of versions 1 to 3 still load. */
TENGRAD_NODISCARD tengrad_status tengrad_save_state(const tengrad_preconditioner *p, void *buffer,
                                                    size_t capacity, size_t *size);

/* Restore state saved by tengrad_save_state. Into a handle with no layers, the saved layers are
   created; into a handle with layers, the saved layers must match them one for one (kind and
   shape). Magic, version, length, checksum and every field are validated, and the restored
   snapshots allocated, before anything changes: on any failure the handle is exactly as before
   (TENGRAD_ERROR_CORRUPT with a precise message, or TENGRAD_ERROR_OUT_OF_MEMORY). */
TENGRAD_NODISCARD tengrad_status tengrad_load_state(tengrad_preconditioner *p, const void *buffer,
                                                    size_t size);

/* ---- KL clipping ------------------------------------------------------------------------ */

/* KL clipping across all layers of a step, as in KFAC implementations:
     ν = min(1, sqrt(kl_clip / (learning_rate² · Σ_layers ⟨update, grad⟩)))
   where each layer contributes the ⟨update, grad⟩ of its most recent tengrad_precondition or
   tengrad_natural_gradient call (for the latter, grad is the batch mean gradient; the product is
   computed exactly from the m×m system). Layers never preconditioned contribute nothing, nor do
   layers not preconditioned since the last tengrad_clear_updates.
   The caller multiplies every layer's update by *out_nu. learning_rate and kl_clip finite, > 0.
   ν is 1 when the sum is not positive. */
TENGRAD_NODISCARD tengrad_status tengrad_kl_clip_factor(const tengrad_preconditioner *p,
                                                        double learning_rate, double kl_clip,
                                                        double *out_nu);

/* ---- Data-parallel helpers (no handle) ---------------------------------------------------

   What every rank must compute identically without communication (docs/DESIGN.md §11), in one
   implementation for every binding. Errors are statuses only (there is no handle to hold a
   message): TENGRAD_ERROR_INVALID_ARGUMENT for NULL, counts < 1 (layers < 0), negative costs,
   non-finite or negative rates, kl_clip <= 0 or a NaN sum; outputs untouched then.

   tengrad_assign_owners: owner rank of each of `layers` layers among `ranks`: layers by cost
   (descending, ties by index), each to the least-loaded rank (ties: the lowest) — KAISA's greedy
   assignment. A cost is what the layer's owner pays, e.g. the floats of a refresh's row plus 4×
   its parameters (what tengrad.torch and examples/c/mlp_mpi.c use).
   tengrad_kl_clip_from_sum: ν = min(1, sqrt(kl_clip / (learning_rate² · sum))) for the global sum
   of every rank's ⟨update, grad⟩ terms (tengrad_get_layer_stats' update_dot_grad of the layers it
   owns); 1 when the sum is not positive or the learning rate is 0. tengrad_kl_clip_factor is the
   same on one handle's layers. */
TENGRAD_NODISCARD tengrad_status tengrad_assign_owners(const int64_t *costs, int32_t layers, int32_t ranks,
                                                       int32_t *out_owners);
TENGRAD_NODISCARD tengrad_status tengrad_kl_clip_from_sum(double learning_rate, double kl_clip, double sum,
                                                          double *out_nu);

/* Forget every layer's last ⟨update, grad⟩: call at the start of a step in which some layers may
   get no update (an unused head), so that tengrad_kl_clip_factor sums only this step's layers. */
TENGRAD_NODISCARD tengrad_status tengrad_clear_updates(tengrad_preconditioner *p);

/* ---- Diagnostics ------------------------------------------------------------------------ */

enum { TENGRAD_LAYER_LINEAR = 1, TENGRAD_LAYER_CONV2D = 2, TENGRAD_LAYER_AFFINE = 3, TENGRAD_LAYER_EMBEDDING = 4 };

typedef struct tengrad_layer_stats {
    size_t size;               /* in: sizeof(tengrad_layer_stats); out: the bytes written */
    int32_t kind;              /* TENGRAD_LAYER_* */
    int32_t conv_strategy;     /* TENGRAD_CONV_FACTORED/EXPLICIT chosen for the last snapshot; 0 for
                                  a linear layer's snapshot of T = 1 */
    int64_t batch;             /* m of the current snapshot; 0 before the first */
    int64_t parameters;        /* numbers in weight (+ bias) */
    int64_t snapshot_bytes;    /* bytes held by the current snapshot */
    int64_t workspace_bytes;   /* peak workspace bytes of the last curvature update */
    double damping;            /* λ of the current factorization */
    double jitter;             /* diagonal jitter added to UᵀU + mλI by the last factorization */
    double rcond;              /* LAPACK reciprocal 1-norm condition estimate of the factorized matrix */
    double curvature_flops;    /* flops of the last curvature update (Grams, factorization) */
    double curvature_seconds;  /* wall seconds of the last curvature update */
    double update_flops;       /* flops of the last precondition / natural_gradient update part */
    double update_seconds;     /* wall seconds of that update part */
    double update_dot_grad;    /* ⟨update, grad⟩ of the last update (see KL clipping) */
    double conv_factored_flops; /* flop-model estimate of the factored conv Gram (0 linear) */
    double conv_explicit_flops; /* flop-model estimate of the explicit conv Gram (0 linear) */
} tengrad_layer_stats;

/* Diagnostics of one layer. */
TENGRAD_NODISCARD tengrad_status tengrad_get_layer_stats(const tengrad_preconditioner *p,
                                                         int32_t layer, tengrad_layer_stats *out);

/* The snapshot of one layer and the representation cost model. Extensible: the caller sets
   `size` to sizeof(tengrad_snapshot_info) (the size its header declares); the library fills the
   fields that fit in `size` bytes and never writes beyond them. A size smaller than this first
   version of the struct is TENGRAD_ERROR_INVALID_ARGUMENT. */
typedef struct tengrad_snapshot_info {
    size_t size;                       /* in: sizeof(tengrad_snapshot_info) */
    int32_t representation;            /* TENGRAD_SNAPSHOT_RAW / _PER_SAMPLE of the current
                                          snapshot; TENGRAD_SNAPSHOT_AUTO (0) when there is none */
    int32_t representation_setting;    /* TENGRAD_SNAPSHOT_* set for the layer */
    int64_t batch;                     /* m of the current snapshot; 0 when there is none */
    int64_t representation_bytes;      /* bytes of the batch copies or of U */
    int64_t snapshot_bytes;            /* representation + the m×m Gram and Cholesky factor */
    double raw_bytes;                  /* cost model for the current batch: bytes of either */
    double per_sample_bytes;           /*   representation, and the cost of one reuse step in  */
    double raw_reuse_cost;             /*   flop-equivalents (a float streamed from memory     */
    double per_sample_reuse_cost;      /*   counts 20 flops); 0 when there is no snapshot      */
} tengrad_snapshot_info;

TENGRAD_NODISCARD tengrad_status tengrad_get_snapshot_info(const tengrad_preconditioner *p,
                                                           int32_t layer,
                                                           tengrad_snapshot_info *info);

#ifdef __cplusplus
} /* extern "C" */
#endif

#endif /* TENGRAD_H */
