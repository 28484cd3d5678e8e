import CCPU
import CKernels

/// The kernel's inner loops outside BLAS: float32 reductions, eight lanes at a time with two
/// accumulators, the gradient's float64 sum of squares, and elementwise passes. A plain `for`
/// loop over floats is not vectorized (the compiler keeps IEEE summation order) and runs at one
/// add per FP-add latency; these reassociate, which float32 rounding of the GEMMs around them
/// already makes immaterial. Callers accumulate float32 results in float64. The gradient's
/// passes (sum of squares, scaling) and the diagonal product run in AVX2 kernels of our own where
/// the CPU has them (`wide`; the library is built for baseline x86-64, where these loops ran on
/// 128-bit SSE2), else in the portable loops here.
enum Reduce {
    /// The AVX2 + FMA kernels of Sources/CKernels run on this CPU: these passes (passes.c) and the
    /// fused linear products (kernels.c, `FusedLinear.available`).
    static let wide = tengrad_cpu_vector_isa() >= Int32(TENGRAD_CPU_ISA_AVX2)

    /// Σ x_i.
    @inline(__always)
    static func sum(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        let raw = UnsafeRawPointer(x)
        var a = SIMD8<Float>(), b = SIMD8<Float>()
        var i = 0
        while i + 16 <= n {
            a += raw.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
            b += raw.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
            i += 16
        }
        var s = (a + b).sum()
        while i < n {
            s += x[i]
            i += 1
        }
        return s
    }

    /// Σ x_i y_i.
    @inline(__always)
    static func dot(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, _ n: Int) -> Float {
        let rx = UnsafeRawPointer(x), ry = UnsafeRawPointer(y)
        var a = SIMD8<Float>(), b = SIMD8<Float>()
        var i = 0
        while i + 16 <= n {
            a += rx.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
                * ry.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
            b += rx.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
                * ry.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
            i += 16
        }
        var s = (a + b).sum()
        while i < n {
            s += x[i] * y[i]
            i += 1
        }
        return s
    }

    /// Σ (x_i + c) y_i.
    @inline(__always)
    static func shiftedDot(_ x: UnsafePointer<Float>, plus c: Float, _ y: UnsafePointer<Float>, _ n: Int) -> Float {
        c == 0 ? dot(x, y, n) : dot(x, y, n) + c * sum(y, n)
    }

    /// Σ x_{i·stride} (strided: not vectorized).
    @inline(__always)
    static func stridedSum(_ x: UnsafePointer<Float>, stride: Int, _ n: Int) -> Float {
        var s: Float = 0
        for i in 0..<n { s += x[i * stride] }
        return s
    }

    /// y_i += x_i (elementwise: vectorized, each y_i rounded as in a scalar loop).
    @inline(__always)
    static func accumulate(_ x: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        for i in 0..<n { y[i] += x[i] }
    }

    /// Σ x_i² in float64, each square exact (a float's square fits a double's 53 bits), four
    /// 4-lane accumulators. Finite exactly when every x_i is finite: the largest square is
    /// FLT_MAX² ≈ 1.2e77, so no count of finite squares overflows a double. 1.6–1.9× OpenBLAS's
    /// dsdot, which sums one product at a time (1M floats from L3 on an EPYC: 0.18 against
    /// 0.27–0.33 ms). With AVX2, eight 4-lane accumulators: 9.6 → 4.5 µs in the 256², m = 32
    /// precondition's profile (docs/DESIGN.md §10).
    static func sumOfSquares(_ x: UnsafePointer<Float>, _ n: Int) -> Double {
        wide ? tengrad_k_sum_squares(x, Int64(n)) : portableSumOfSquares(x, n)
    }

    /// `sumOfSquares` in portable Swift (CPUs without AVX2; the tests compare the two).
    static func portableSumOfSquares(_ x: UnsafePointer<Float>, _ n: Int) -> Double {
        let raw = UnsafeRawPointer(x)
        var a = SIMD4<Double>(), b = SIMD4<Double>(), c = SIMD4<Double>(), d = SIMD4<Double>()
        var i = 0
        while i + 16 <= n {
            let x0 = SIMD4<Double>(raw.loadUnaligned(fromByteOffset: 4 * i, as: SIMD4<Float>.self))
            let x1 = SIMD4<Double>(raw.loadUnaligned(fromByteOffset: 4 * i + 16, as: SIMD4<Float>.self))
            let x2 = SIMD4<Double>(raw.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD4<Float>.self))
            let x3 = SIMD4<Double>(raw.loadUnaligned(fromByteOffset: 4 * i + 48, as: SIMD4<Float>.self))
            a += x0 * x0
            b += x1 * x1
            c += x2 * x2
            d += x3 * x3
            i += 16
        }
        var sum = ((a + b) + (c + d)).sum()
        while i < n {
            let v = Double(x[i])
            sum += v * v
            i += 1
        }
        return sum
    }

    /// y_i = β x_i (x may be y; β = 1 copies): the (1/λ) v an update starts from, one pass
    /// instead of a copy and BLAS's β pass. Measured with `tengrad-bench --linear-only` (AMD
    /// EPYC, 2 threads, 3 alternating runs): the out-of-place precondition at m = 32, 1024² went
    /// from 0.69 to 0.84 of its two-GEMM floor; in place within the runs' spread. In two halves
    /// on two threads of the library's own for large arrays (`inHalves`): 16M floats in 6.2 against 9.6 ms when OpenBLAS's idle
    /// worker sleeps soon (the Python binding's OPENBLAS_THREAD_TIMEOUT=20), 10.9 against 10.1 ms
    /// while it still spins for OpenBLAS's default 2^28 cycles after the call before.
    ///
    /// Out of place from `twoThreadArrayCount` floats (16 MiB), the AVX2 kernel writes around the
    /// cache: GEMM then reads the update from memory either way, and the stores no longer read
    /// y's lines first (a C driver, 4096², one thread, then the m = 128 GEMM: the pass 8.1 → 5.0
    /// ms, with the GEMM 38.5 → 34.7; 1024², which stays in L3, even).
    ///
    /// In place from the same size, OpenBLAS's `sscal` on its own threads: the call follows a GEMM
    /// (Uᵀv's, or the previous layer's), after which OpenBLAS's worker spins on the other core and
    /// takes the job at once, where our helper had to share that core with it (`tengrad-bench
    /// --size 128,4096`, the builds before and after in six alternating runs: in place 0.81–0.86 →
    /// 0.85–0.90 of the floor).
    static func scale(_ x: UnsafePointer<Float>, by beta: Float, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        let inPlace = UnsafePointer(y) == x, large = n >= twoThreadArrayCount
        if beta == 1 && inPlace { return }  // nothing to do: no pass, no thread
        if inPlace && large { return BLAS.sscal(n: n, alpha: beta, x: y) }
        inHalves(n) { _, range in  // streamed when large (out of place here)
            scaleRun(x + range.lowerBound, by: beta, into: y + range.lowerBound, range.count, stream: large)
        }
    }

    private static func scaleRun(
        _ x: UnsafePointer<Float>, by beta: Float, into y: UnsafeMutablePointer<Float>, _ n: Int, stream: Bool
    ) {
        if beta == 1 { return y.update(from: x, count: n) }
        if wide { return tengrad_k_scale(x, beta, y, Int64(n), stream ? 1 : 0) }
        portableScale(x, by: beta, into: y, n)
    }

    /// y_i = β x_i in portable Swift (CPUs without AVX2; the tests compare the two).
    static func portableScale(_ x: UnsafePointer<Float>, by beta: Float, into y: UnsafeMutablePointer<Float>, _ n: Int) {
        let rx = UnsafeRawPointer(x), ry = UnsafeMutableRawPointer(y), b = SIMD8<Float>(repeating: beta)
        var i = 0
        while i + 16 <= n {
            let u = rx.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
            let v = rx.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
            ry.storeBytes(of: u * b, toByteOffset: 4 * i, as: SIMD8<Float>.self)
            ry.storeBytes(of: v * b, toByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
            i += 16
        }
        while i < n {
            y[i] = beta * x[i]
            i += 1
        }
    }

    /// Row q of `out` (`cols` floats, contiguous) = w_q · row q of `g` (row stride `ldg`), with
    /// w_q = Float(αs · x[q / positions]) (the same rounding as the scalar expression); with `sums`,
    /// sums_c = Σ_q out[q][c] in order of q. The gradients scaled per sample for U x, and the bias
    /// part's column sums, in one pass (with AVX2; in a profile of the 256², m = 512 precondition
    /// the two SSE2 loops took 41 µs).
    static func scaledRows(
        _ rows: Int, cols: Int, g: UnsafePointer<Float>, ldg: Int, x: UnsafePointer<Double>, alphaS: Double,
        positions: Int, into out: UnsafeMutablePointer<Float>, sums: UnsafeMutablePointer<Float>?
    ) {
        if wide {
            return tengrad_k_scaled_rows(Int64(rows), Int64(cols), g, Int64(ldg), x, alphaS, Int64(positions), out, sums)
        }
        portableScaledRows(rows, cols: cols, g: g, ldg: ldg, x: x, alphaS: alphaS, positions: positions, into: out, sums: sums)
    }

    /// `scaledRows` in portable Swift (CPUs without AVX2; the tests compare the two: the same bits).
    static func portableScaledRows(
        _ rows: Int, cols: Int, g: UnsafePointer<Float>, ldg: Int, x: UnsafePointer<Double>, alphaS: Double,
        positions: Int, into out: UnsafeMutablePointer<Float>, sums: UnsafeMutablePointer<Float>?
    ) {
        for q in 0..<rows {
            let w = Float(alphaS * x[q / positions])
            let from = g + q * ldg, to = out + q * cols
            for c in 0..<cols { to[c] = w * from[c] }
        }
        guard let sums, rows > 0 else { return }
        sums.update(from: out, count: cols)
        for q in 1..<rows { accumulate(out + q * cols, into: sums, cols) }
    }

    /// out_q = init_q + Σ_o t[o·n + q] g[q·ld + o] for q < n: the diagonal of G·T with T
    /// channel-major (n per row) and G position-major. With AVX2, eight positions at a time, their
    /// G rows transposed eight channels at a time in registers (two FMA chains).
    static func diagonalProduct(
        t: UnsafePointer<Float>, n: Int, g: UnsafePointer<Float>, ld: Int, cols: Int,
        into out: UnsafeMutablePointer<Float>
    ) {
        if wide { return tengrad_k_diagonal_product(t, Int64(n), g, Int64(ld), Int64(cols), out) }
        portableDiagonalProduct(t: t, n: n, g: g, ld: ld, cols: cols, into: out)
    }

    /// `diagonalProduct` in portable Swift (CPUs without AVX2; the tests compare the two), summed
    /// over o = 0, 1, … in order (the bits of a scalar loop). Sixteen positions at a time, each
    /// 64 channels of their G rows copied transposed into a 4 KiB tile first: a walk down G's
    /// columns touches one cache line per element, and with a power-of-two leading dimension
    /// every line falls in the same L1 set (measured: 1.4 ns per element at 128 × 1024, more
    /// than the GEMM that made T).
    static func portableDiagonalProduct(
        t: UnsafePointer<Float>, n: Int, g: UnsafePointer<Float>, ld: Int, cols: Int,
        into out: UnsafeMutablePointer<Float>
    ) {
        let lanes = 16, depth = 64
        withUnsafeTemporaryAllocation(of: Float.self, capacity: lanes * depth) { buffer in
            let tile = buffer.baseAddress!
            let tRaw = UnsafeRawPointer(t), tileRaw = UnsafeRawPointer(tile)
            var q0 = 0
            while q0 + lanes <= n {
                var acc = UnsafeRawPointer(out + q0).loadUnaligned(as: SIMD16<Float>.self)
                var o0 = 0
                while o0 < cols {
                    let width = min(depth, cols - o0)
                    for lane in 0..<lanes {
                        let row = g + (q0 + lane) * ld + o0
                        for o in 0..<width { tile[o * lanes + lane] = row[o] }
                    }
                    for o in 0..<width {
                        let tv = tRaw.loadUnaligned(fromByteOffset: 4 * ((o0 + o) * n + q0), as: SIMD16<Float>.self)
                        acc += tv * tileRaw.load(fromByteOffset: 4 * o * lanes, as: SIMD16<Float>.self)
                    }
                    o0 += width
                }
                UnsafeMutableRawPointer(out + q0).storeBytes(of: acc, as: SIMD16<Float>.self)
                q0 += lanes
            }
            for q in q0..<n {
                var sum = out[q]
                let row = g + q * ld
                for o in 0..<cols { sum += t[o * n + q] * row[o] }
                out[q] = sum
            }
        }
    }
}
