/* An installed-library consumer (make test-install): built with `pkg-config --cflags --libs
   tengrad` (as C) or CMake's find_package(TENGraD) (as C++), run with no LD_LIBRARY_PATH. Checks
   the header/library versions and one natural-gradient call against a hand-computed case, and
   prints the BLAS it runs on; with an argument, that BLAS build must match it and run
   non-generic kernels. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "tengrad.h"

int main(int argc, char **argv) {
    if (tengrad_version_number() != TENGRAD_VERSION_NUMBER) {
        fprintf(stderr, "library %d, header %d\n", (int)tengrad_version_number(), (int)TENGRAD_VERSION_NUMBER);
        return 1;
    }
    /* One sample, a 1→1 linear layer without bias: u = s·g·a = 2·1·3 = 6, F = 36; the natural
       gradient of the sample's gradient is 6 / (36 + λ) with λ = 0.5. */
    tengrad_preconditioner *p = NULL;
    int32_t layer = -1;
    float a = 3.0f, g = 1.0f, w = 0.0f;
    if (tengrad_create(&p) != TENGRAD_OK || tengrad_set_damping(p, 0.5) != TENGRAD_OK ||
        tengrad_add_linear(p, 1, 1, 0, &layer) != TENGRAD_OK ||
        tengrad_natural_gradient(p, layer, 1, &a, &g, 2.0f, &w, NULL) != TENGRAD_OK) {
        fprintf(stderr, "call failed: %s\n", tengrad_last_error(p));
        return 1;
    }
    tengrad_destroy(p);
    double want = 6.0 / 36.5;
    if (fabs(w - want) > 1e-6 * want) {
        fprintf(stderr, "natural gradient %g, want %g\n", (double)w, want);
        return 1;
    }
    tengrad_blas_info blas;
    blas.size = sizeof blas;
    if (tengrad_get_blas_info(&blas) != TENGRAD_OK) {
        fprintf(stderr, "tengrad_get_blas_info failed\n");
        return 1;
    }
    printf("BLAS: %s %s (%s), core %s, generic fallback %d\n", blas.library, blas.version, blas.build, blas.core,
           (int)blas.generic_fallback);
    if (argc > 1 && (strcmp(blas.build, argv[1]) != 0 || blas.generic_fallback)) {
        fprintf(stderr, "expected the %s build with non-generic kernels\n", argv[1]);
        return 1;
    }
    printf("installed libtengrad %d: natural gradient %.6f (want %.6f)\n", (int)tengrad_version_number(), (double)w, want);
    return 0;
}
