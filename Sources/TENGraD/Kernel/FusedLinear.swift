import CKernels

/// The linear precondition's two products in kernels of our own (Sources/CKernels, AVX2 + FMA;
/// docs/DESIGN.md §10): `T = V Aᵀ` with the gradient's validation (its float64 sum of squares) in
/// the same pass over V, and `W = (1/λ) V − Gsᵀ A` with the (1/λ) V term in the epilogue. With
/// OpenBLAS the call read V four times (validation, T, the (1/λ) pass, the accumulation) and
/// wrote it twice; here twice and once. For linear layers (one group, positions as rows, the
/// activations a view) over at most `maxPositions` positions, on CPUs with AVX2 and FMA.
struct FusedLinear {
    /// The kernels run on this CPU (AVX2 and FMA: `Reduce.wide`).
    static var available: Bool { Reduce.wide }
    /// Batch positions (samples × tokens) up to which the kernels replace OpenBLAS's GEMMs. The
    /// products grow with the positions, the passes saved do not: at 4096² with OpenBLAS's worker
    /// still spinning from a call just before (its default timeout; our second thread then shares
    /// that core), in place 32 positions 36.6 → 31.1 ms, 64: 46.7 → 48.9, 128: 71.5 → 81.6 (with
    /// the Python binding's short timeout 128 gained, 65.1 → 60.5). Beyond 64, OpenBLAS's path.
    /// Re-measured with the faster kernels (`tengrad-bench --linear-only`, 2 runs each, m = 128,
    /// this limit against 128): out of place 4096² gained (64 → 53 ms) but 1024² lost (3.5 → 4.3);
    /// in place, what `tengrad.torch` now runs, 1024² was even and 4096² lost (0.83–0.86 → 0.75–0.81
    /// of the floor). So 64 stays.
    static let maxPositions = 64
    /// Weight gradients from this many floats (2 MiB) take the fused path. In-process A/B, AMD EPYC
    /// Zen 3, 2 threads, m = 32, in place, OpenBLAS's path against fused: 4096² 19.5 → 16.6 ms,
    /// 2048² 4.88 → 4.37, 1024² 1.39 → 1.26, 768² 0.74 → 0.68; 512² 0.37 → 0.40 (a loss: the
    /// second thread's start, about 50 µs, is a tenth of the call), 256² 0.11 → 0.18. On one
    /// thread fused was ahead from 256² at m = 32 but not at m = 8. Tests lower it to reach the
    /// kernels with small layers; nothing else changes it.
    nonisolated(unsafe) static var minWeights = 1 << 19

    let out: Int
    let inFeatures: Int
    /// Positions: samples × tokens.
    let n: Int

    /// The fused path for this kernel and batch, or nil when OpenBLAS's path runs.
    init?(kernel k: BlockKernel, m: Int) {
        let d = k.dims
        guard FusedLinear.available, k.sparse == nil, k.geometry is LinearGeometry, d.groups == 1, d.positionMajor
        else { return nil }
        let n = m * d.positions
        guard n <= FusedLinear.maxPositions, d.weightCount >= FusedLinear.minWeights else { return nil }
        (out, inFeatures, self.n) = (d.groupOut, d.patch, n)
    }

    private static func roundUp(_ x: Int, _ k: Int) -> Int { (x + k - 1) / k * k }
    var tiles: Int { (out + Int(TENGRAD_K_TILE_ROWS) - 1) / Int(TENGRAD_K_TILE_ROWS) }

    /// Floats of workspace: T (out × n), the packed activations for either product (one region:
    /// the first product's panels are dead when the second's are packed), the scaled gradients,
    /// the per-position weights (first the per-position sums of Uᵀv).
    var floats: Int { out * n + packedFloats + FusedLinear.roundUp(out, 6) * n + n }
    /// The larger of the two packings: Aᵀ by 16 positions, A by 16 features (one panel more for the
    /// output's shift).
    private var packedFloats: Int {
        max(FusedLinear.roundUp(n, 16) * inFeatures, (FusedLinear.roundUp(inFeatures, 16) + 16) * n)
    }
    /// Doubles of workspace: the per-tile sums of squares.
    var doubles: Int { tiles }

    /// Where each part lives in `floats` floats of workspace.
    private typealias Floats = UnsafeMutablePointer<Float>
    private func layout(_ work: Floats) -> (t: Floats, ap: Floats, af: Floats, gp: Floats, w: Floats) {
        let t = work, packed = t + out * n, gp = packed + packedFloats
        return (t, packed, packed, gp, gp + FusedLinear.roundUp(out, 6) * n)
    }

    /// t_i = s Σ_l ⟨G_il, V a_il + b⟩ (Uᵀv per sample, `positions` positions each) through T = V Aᵀ,
    /// and returns Σ v² over the weight gradient in float64, summed over row tiles in order (the
    /// same bits on one thread or two). `work` holds `floats`, `sums` `doubles`.
    func project(
        v: UnsafePointer<Float>, bias: UnsafePointer<Float>?, a: UnsafePointer<Float>, g: UnsafePointer<Float>,
        scale s: Double, positions L: Int, into t: UnsafeMutablePointer<Double>,
        work: UnsafeMutablePointer<Float>, sums: UnsafeMutablePointer<Double>
    ) -> Double {
        let (tw, ap, _, _, acc) = layout(work)
        tengrad_k_pack_positions(Int64(n), Int64(inFeatures), a, Int64(inFeatures), ap)
        var job = tengrad_k_project_job(
            out: Int64(out), in: Int64(inFeatures), n: Int64(n), v: v, ap: ap, t: tw, tile_sums: sums, next: 0)
        withUnsafeMutablePointer(to: &job) { p in run { tengrad_k_project_work(p) } }
        var sum = 0.0
        for i in 0..<tiles { sum += sums[i] }
        for i in 0..<n / L { t[i] = 0 }
        BlockKernel.addPositionProducts(
            t: tw, g: g, ld: out, cols: out, bias: bias, samples: n / L, positions: L, scale: s, into: t, scratch: acc)
        return sum
    }

    /// W = β V + Σ_q w_q G_q a_qᵀ and, with a bias, b = β b_v + Σ_q w_q G_q, where w_q = α s x_i for
    /// the positions q of sample i. W may be V, b may be b_v. Returns the flops.
    func apply(
        v: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?, beta: Float, a: UnsafePointer<Float>,
        g: UnsafePointer<Float>, scale s: Double, x: UnsafePointer<Double>, alpha: Double, positions L: Int,
        weight: UnsafeMutablePointer<Float>, bias: UnsafeMutablePointer<Float>?, work: UnsafeMutablePointer<Float>
    ) -> Double {
        let (sumsB, _, af, gp, wq) = layout(work)  // T's space holds the bias sums now
        for q in 0..<n { wq[q] = Float(alpha * s * x[q / L]) }
        // Out of place, panels shifted so that the weight's rows are written in whole 64-byte
        // lines (when `inFeatures` is a multiple of 16, every row; else row 0): the output's lines
        // are not in cache (one thread, 1024², m = 32, numpy's arrays 16 bytes past a line: the
        // kernel 1.13 → 0.96 ms). In place they come in with the load of V, and the kernel alone
        // gained 1–2 %, not worth the extra partial panel.
        let shift = UnsafePointer(weight) == v ? 0 : Int64((Int(bitPattern: weight) >> 2) & 15)
        tengrad_k_pack_features(Int64(n), Int64(inFeatures), shift, a, Int64(inFeatures), af)
        tengrad_k_pack_gradients(Int64(n), Int64(out), g, Int64(out), wq, gp)
        var job = tengrad_k_apply_job(
            out: Int64(out), in: Int64(inFeatures), n: Int64(n), gp: gp, ap: af, v: v, beta: beta, w: weight, shift: shift,
            next: 0)
        withUnsafeMutablePointer(to: &job) { p in run { tengrad_k_apply_work(p) } }
        if let bias, let biasGrad {
            for o in 0..<out { sumsB[o] = 0 }
            for q in 0..<n {
                let row = g + q * out, w = wq[q]
                for o in 0..<out { sumsB[o] += w * row[o] }
            }
            for o in 0..<out { bias[o] = beta * biasGrad[o] + sumsB[o] }
        }
        return 2 * Double(n) * Double(out) * Double(inFeatures + 1)
    }

    /// A job's tiles on the calling thread, and on a second one when BLAS may use two threads
    /// (`minWeights` repays a thread's start); each thread takes tiles until none is left, so a
    /// second thread that gets no core costs nothing but its start.
    private func run(_ work: () -> Void) {
        guard BLAS.threads >= 2, out > Int(TENGRAD_K_TILE_ROWS) else { return work() }
        onTwoThreads { _ in work() }
    }
}
