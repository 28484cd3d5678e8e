#if ScipyOpenBLAS
import CScipyOpenBLAS
#else
import COpenBLAS
#endif
import Synchronization

// The one seam to BLAS/LAPACK. Every call into OpenBLAS or LAPACKE goes through this file.
// Two builds, chosen by the package trait (docs/DESIGN.md §14): the system's OpenBLAS +
// LAPACKE, or PyPI's scipy-openblas32, whose shim gives its prefixed symbols the same names.
// Matrices are row-major (the C ABI's layout) for BLAS; LAPACK sees the symmetric m×m system,
// which is the same in either layout, and is called column-major (its native, faster layout).
// Callers validate that every dimension fits a 32-bit BLAS index (`BLAS.maxDimension`).

/// The calls inside `BLAS.withThreads` now, and OpenBLAS's thread count before the first of them:
/// the library's one piece of process-wide state, guarding OpenBLAS's own.
struct ThreadCountHolders {
    var count = 0
    var baseline: Int32 = 0
}
private let threadCountHolders = Mutex(ThreadCountHolders())

enum BLAS {
    /// The largest dimension OpenBLAS's 32-bit `blasint` accepts.
    static let maxDimension = Int(Int32.max)

    @inline(__always) static func i(_ n: Int) -> Int32 { Int32(truncatingIfNeeded: n) }

    /// OpenBLAS's process-wide thread count (its own pool; OPENBLAS_NUM_THREADS at start-up).
    static var threads: Int { Int(openblas_get_num_threads()) }

    /// Which OpenBLAS build is linked: "system" or "scipy-openblas32".
    static var build: String { TENGRAD_BLAS_BUILD }

    /// OpenBLAS's build configuration, e.g. "OpenBLAS 0.3.34 DYNAMIC_ARCH NO_AFFINITY SkylakeX MAX_THREADS=64".
    static var config: String { openblas_get_config().map { String(cString: $0) } ?? "" }

    /// The kernel set OpenBLAS chose for this CPU at load time (or OPENBLAS_CORETYPE's), e.g. "SkylakeX".
    static var coreName: String { openblas_get_corename().map { String(cString: $0) } ?? "" }

    /// Runs `body` with OpenBLAS using `count` threads (0: as configured), then restores the count
    /// it found. OpenBLAS's count is process-wide: calls on other handles that overlap this one may
    /// see `count` while it runs (documented in tengrad.h), but when the last overlapping call
    /// returns, the count is the one the first of them found — never left changed by an
    /// interleaving of restores (`ThreadCountHolders`).
    static func withThreads<R, E: Error>(_ count: Int, _ body: () throws(E) -> R) throws(E) -> R {
        guard count > 0 else { return try body() }
        let previous = threadCountHolders.withLock { holders in
            let previous = openblas_get_num_threads()
            if holders.count == 0 { holders.baseline = previous }
            holders.count += 1
            if Int(previous) != count { openblas_set_num_threads(Int32(clamping: count)) }
            return previous
        }
        defer {
            threadCountHolders.withLock { holders in
                holders.count -= 1
                let restore = holders.count == 0 ? holders.baseline : previous
                if openblas_get_num_threads() != restore { openblas_set_num_threads(restore) }
            }
        }
        return try body()
    }

    /// C[m×n] = alpha · op(A) · op(B) + beta · C, row-major.
    static func sgemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Float, a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_sgemm(
            CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
            i(m), i(n), i(k), alpha, a, i(lda), b, i(ldb), beta, c, i(ldc))
    }

    /// C_b = op(A_b) · op(B_b) for b < count, row-major, with A_b = a + b·strideA and so on (β = 0).
    /// Many small products (one per sample): OpenBLAS ≥ 0.3.28's sgemm_batch_strided spreads the
    /// batch over its threads (measured on 32×784·784×288 per sample, 128 samples: 96 vs 80 GFLOP/s
    /// as a loop of sgemm calls, and 94 vs 24 for 32×784·784×9); older OpenBLAS builds loop.
    static func sgemmBatch(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        a: UnsafePointer<Float>, lda: Int, strideA: Int, b: UnsafePointer<Float>, ldb: Int, strideB: Int,
        c: UnsafeMutablePointer<Float>, ldc: Int, strideC: Int, count: Int
    ) {
        #if ScipyOpenBLAS
        if count > 1, let sa = Int32(exactly: strideA), let sb = Int32(exactly: strideB), let sc = Int32(exactly: strideC) {
            cblas_sgemm_batch_strided(
                CblasRowMajor, transA ? CblasTrans : CblasNoTrans, transB ? CblasTrans : CblasNoTrans,
                i(m), i(n), i(k), 1, a, i(lda), sa, b, i(ldb), sb, 0, c, i(ldc), sc, i(count))
            return
        }
        #endif
        for j in 0..<count {
            sgemm(transA: transA, transB: transB, m: m, n: n, k: k, alpha: 1, a: a + j * strideA, lda: lda,
                  b: b + j * strideB, ldb: ldb, beta: 0, c: c + j * strideC, ldc: ldc)
        }
    }

    /// B[cols×rows] = Aᵀ for row-major A[rows×cols] (row strides lda and ldb): OpenBLAS's
    /// out-of-place transposed copy (one thread).
    static func transpose(
        rows: Int, cols: Int, a: UnsafePointer<Float>, lda: Int, into b: UnsafeMutablePointer<Float>, ldb: Int
    ) {
        cblas_somatcopy(CblasRowMajor, CblasTrans, i(rows), i(cols), 1, a, i(lda), b, i(ldb))
    }

    /// Lower triangle of C[n×n] = A · Aᵀ for row-major A[n×k] (`trans`: Aᵀ · A for A[k×n]).
    static func syrkLower(
        trans: Bool, n: Int, k: Int, a: UnsafePointer<Float>, lda: Int, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_ssyrk(CblasRowMajor, CblasLower, trans ? CblasTrans : CblasNoTrans, i(n), i(k), 1, a, i(lda), 0, c, i(ldc))
    }

    /// x = alpha · x over n floats, in calls of at most 2³⁰ (OpenBLAS spreads each over its
    /// threads from about 1M floats). One rounding per entry, as `Reduce.scale`'s.
    static func sscal(n: Int, alpha: Float, x: UnsafeMutablePointer<Float>) {
        var done = 0
        while done < n {
            let count = min(n - done, 1 << 30)
            cblas_sscal(i(count), alpha, x + done, 1)
            done += count
        }
    }

    /// y = alpha · A · x + beta · y for row-major A[m×n] (row stride lda); `trans` uses Aᵀ (y has
    /// n entries). β = 0 overwrites y whatever it held (it is zeroed first: BLAS may keep NaN·0).
    static func sgemv(
        trans: Bool, m: Int, n: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
        x: UnsafePointer<Float>, beta: Float, y: UnsafeMutablePointer<Float>
    ) {
        if beta == 0 { y.update(repeating: 0, count: trans ? n : m) }
        cblas_sgemv(CblasRowMajor, trans ? CblasTrans : CblasNoTrans, i(m), i(n), alpha, a, i(lda), x, 1, beta, y, 1)
    }

    // LAPACK is called directly (not through LAPACKE, whose NaN scan of every input matrix costs
    // as much as a small factorization): our inputs are checked finite before they get here.

    /// Cholesky factorization in place (lower triangle, column-major) of the symmetric positive
    /// definite n×n matrix. Returns LAPACK's info: 0 on success, > 0 when a minor is not positive.
    static func choleskyFactor(n: Int, a: UnsafeMutablePointer<Double>) -> Int {
        var uplo = CChar(UInt8(ascii: "L")), nn = i(n), lda = i(n), info: Int32 = 0
        dpotrf_(&uplo, &nn, a, &lda, &info, 1)
        return Int(info)
    }

    /// Solves (L Lᵀ) X = B in place for B[n×nrhs] column-major, with L from `choleskyFactor`.
    /// One right-hand side takes two triangular solves (dtrsv), 2–5× faster than dpotrs here for
    /// n ≥ 128 (OpenBLAS's dtrsm path for a single column is slow).
    static func choleskySolve(n: Int, nrhs: Int, factor: UnsafePointer<Double>, b: UnsafeMutablePointer<Double>) {
        if nrhs == 1 {
            cblas_dtrsv(CblasColMajor, CblasLower, CblasNoTrans, CblasNonUnit, i(n), factor, i(n), b, 1)
            cblas_dtrsv(CblasColMajor, CblasLower, CblasTrans, CblasNonUnit, i(n), factor, i(n), b, 1)
            return
        }
        var uplo = CChar(UInt8(ascii: "L")), nn = i(n), r = i(nrhs), lda = i(n), ldb = i(n), info: Int32 = 0
        dpotrs_(&uplo, &nn, &r, factor, &lda, b, &ldb, &info, 1)
    }

    /// Reciprocal 1-norm condition estimate of an SPD matrix from its Cholesky factor.
    static func choleskyRcond(n: Int, factor: UnsafePointer<Double>, anorm: Double) -> Double {
        var rcond = 0.0
        let info = LAPACKE_dpocon(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "L")), i(n), factor, i(n), anorm, &rcond)
        return info == 0 ? rcond : .nan
    }
}
