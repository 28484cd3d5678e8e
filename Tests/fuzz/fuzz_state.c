/*
 * libFuzzer harness: arbitrary bytes to tengrad_load_state. The first input byte chooses a mode:
 * even — the bytes as given (the checksum stops almost everything at the door); odd — the rest
 * of the input with its payload length and XXH64 checksum repaired, so the fuzzer reaches the
 * field parser and validator behind them. Whatever loads must save and load again.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tengrad.h"

static uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }  /* little-endian host */
static uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static uint64_t xxh64(const uint8_t *p, size_t n) {
    const uint64_t P1 = 0x9E3779B185EBCA87ull, P2 = 0xC2B2AE3D27D4EB4Full, P3 = 0x165667B19E3779F9ull,
                   P4 = 0x85EBCA77C2B2AE63ull, P5 = 0x27D4EB2F165667C5ull;
    size_t i = 0;
    uint64_t h;
#define ROUND(acc, v) (rotl((acc) + (v) * P2, 31) * P1)
    if (n >= 32) {
        uint64_t v1 = P1 + P2, v2 = P2, v3 = 0, v4 = 0 - P1;
        for (; i + 32 <= n; i += 32) {
            v1 = ROUND(v1, rd64(p + i));
            v2 = ROUND(v2, rd64(p + i + 8));
            v3 = ROUND(v3, rd64(p + i + 16));
            v4 = ROUND(v4, rd64(p + i + 24));
        }
        h = rotl(v1, 1) + rotl(v2, 7) + rotl(v3, 12) + rotl(v4, 18);
        uint64_t vs[4] = {v1, v2, v3, v4};
        for (int k = 0; k < 4; k++) h = (h ^ ROUND(0, vs[k])) * P1 + P4;
    } else {
        h = P5;
    }
    h += (uint64_t)n;
    for (; i + 8 <= n; i += 8) h = rotl(h ^ ROUND(0, rd64(p + i)), 27) * P1 + P4;
    if (i + 4 <= n) { h = rotl(h ^ ((uint64_t)rd32(p + i) * P1), 23) * P2 + P3; i += 4; }
    for (; i < n; i++) h = rotl(h ^ (p[i] * P5), 11) * P1;
#undef ROUND
    h ^= h >> 33; h *= P2; h ^= h >> 29; h *= P3; h ^= h >> 32;
    return h;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size == 0) return 0;
    int repair = data[0] & 1;
    size_t n = size - 1;
    uint8_t *blob = (uint8_t *)malloc(n ? n : 1);
    if (!blob) return 0;
    memcpy(blob, data + 1, n);
    if (repair && n >= 32) {
        uint64_t payload = (uint64_t)(n - 24 - 8);
        memcpy(blob + 16, &payload, 8);
        uint64_t sum = xxh64(blob, n - 8);
        memcpy(blob + n - 8, &sum, 8);
    }
    tengrad_preconditioner *p = NULL;
    if (tengrad_create(&p) != TENGRAD_OK) abort();
    if (tengrad_set_memory_limit(p, 1 << 26) != TENGRAD_OK) abort();  /* bound what a blob can allocate */
    if (tengrad_load_state(p, blob, n) == TENGRAD_OK) {
        size_t m = 0;
        if (tengrad_save_state(p, NULL, 0, &m) != TENGRAD_OK) abort();
        uint8_t *again = (uint8_t *)malloc(m);
        if (again && tengrad_save_state(p, again, m, &m) == TENGRAD_OK) {
            tengrad_preconditioner *q = NULL;
            if (tengrad_create(&q) != TENGRAD_OK || tengrad_load_state(q, again, m) != TENGRAD_OK) abort();
            tengrad_destroy(q);
        }
        free(again);
    }
    tengrad_destroy(p);
    free(blob);
    return 0;
}
