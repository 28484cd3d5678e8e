/* Minimal test macros shared by the C tests: count checks, report failures, print
   "N passed, N failed" at the end (the line CI reads). */
#ifndef TENGRAD_TEST_CHECK_H
#define TENGRAD_TEST_CHECK_H
#include <stdio.h>

static int passed = 0, failed = 0;

#define CHECK(cond)                                                                      \
    do {                                                                                 \
        if (cond) {                                                                      \
            passed++;                                                                    \
        } else {                                                                         \
            failed++;                                                                    \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);     \
        }                                                                                \
    } while (0)

static int report(void) {
    printf("%d passed, %d failed\n", passed, failed);
    return failed == 0 ? 0 : 1;
}
#endif
