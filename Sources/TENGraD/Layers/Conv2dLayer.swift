/// A 2-D convolution with its exact Fisher block (SPEC §2), groups, stride, padding and
/// dilation included, no spatial-averaging approximation.
///
/// Per sample i and group γ, with Ĩ_iγ the unfolded input (P rows (c, ki, kj) × L positions, plus a
/// row of ones for the bias) and G_iγ the output gradient (C_out/groups × L):
///
///     Δ_iγ = s · G_iγ Ĩ_iγᵀ,    u_i = (Δ_i1, …, Δ_iG)   ⇒   K = UᵀU = Σ_γ K_γ  (exact for groups)
///
/// Two exact ways to the Gram, chosen per call by a flop model (or forced by a setting):
///
/// * factored: K_ij = s² Σ_γ Σ_{l,p} (Ĩ_iγ[:,l]·Ĩ_jγ[:,p] + 1) (G_iγ[:,l]·G_jγ[:,p]) — two GEMMs of
///   pairwise patch and gradient products over sample blocks; ≈ G·m²·L²·(P + C_out/G + 1) flops;
/// * explicit: form each Δ_iγ (one small GEMM per sample) and take the Gram of the rows;
///   ≈ 2·m·L·C_out·P + m²·C_out·(P + 1) flops.
///
/// The factored form wins when L is small (deep, downsampled layers); the explicit one otherwise.
/// Neither keeps per-sample gradients beyond one block: the reuse path computes
///
///     (Uᵀv)_i = s Σ_γ ⟨G_iγ, V_γ Ĩ_iγ⟩,      U x = s Σ_i x_i G_iγ Ĩ_iγᵀ
///
/// from the kept activations and output gradients, unfolding samples in chunks on the fly, so the
/// snapshot is the raw batch (m·(C_in·H·W + C_out·L) floats) plus the m×m system.
///
/// Workspaces are chunked over samples (and output channels) to stay within `workspaceTarget`
/// bytes, or less when the handle's memory limit leaves less.
final class Conv2dLayer: ExactBlockLayer {
    let geometry: Conv2dGeometry
    /// Strategy setting: `.auto` lets the flop model choose.
    var strategySetting: ConvStrategy = .auto
    private(set) var chosen: ConvStrategy = .auto
    /// Flop-model estimates of the last Gram, for diagnostics.
    private(set) var factoredEstimate = 0.0, explicitEstimate = 0.0
    /// Samples per chunk in `projectGradient` / `applyU`, set by `updateWorkspace`.
    private var updateChunk = 1

    /// Per-call workspace target: 64 MiB keeps a chunk of unfolded patches in the last-level
    /// caches' neighbourhood while making the chunks' GEMMs large enough to run at full speed.
    static let workspaceTarget = 64 << 20

    init(_ shape: Conv2dShape) throws(TENGraDError) {
        geometry = try Conv2dGeometry(shape)
        try super.init(kind: .conv2d, weightCount: geometry.weightCount, biasCount: shape.hasBias ? shape.outChannels : 0)
    }

    override var termsPerEntry: Double { Double(geometry.positions) }
    override var lastStrategy: ConvStrategy { chosen }

    override var stats: LayerStats {
        var s = super.stats
        s.factoredFlopsEstimate = factoredEstimate
        s.explicitFlopsEstimate = explicitEstimate
        return s
    }

    override func inputCounts(batch: Int) throws(TENGraDError) -> (activations: Int, outputGrads: Int) {
        guard batch > 0 else { throw .invalid("batch must be positive, got \(batch)") }
        guard batch <= BLAS.maxDimension else { throw .shape("batch \(batch) exceeds \(BLAS.maxDimension) (32-bit BLAS)") }
        return (
            try checkedProduct(batch, geometry.inputSize, what: "batch × C_in × H × W"),
            try checkedProduct(batch, geometry.outputSize, what: "batch × C_out × H_out × W_out")
        )
    }

    // MARK: - Memory

    /// Floats a workspace may take now: the target, or what the memory limit leaves after
    /// `reserve` bytes still to be allocated by the call (the current float workspace counts as
    /// free, since growing it releases it first).
    private func workspaceFloats(_ context: LayerContext, reserve: Int) -> Int {
        var bytes = Conv2dLayer.workspaceTarget
        if context.budget.limit > 0 {
            bytes = min(bytes, context.budget.limit - context.budget.inUse + context.workspace.floatBytes - reserve)
        }
        return max(bytes, 0) / MemoryLayout<Float>.stride
    }

    /// Largest chunk c ≤ m with fixed + c·perSample ≤ available (at least 1).
    private static func chunk(_ m: Int, fixed: Int, perSample: Int, available: Int) -> Int {
        guard perSample > 0 else { return m }
        return max(1, min(m, (available - fixed) / perSample))
    }

    // MARK: - Gram

    override func buildGram(
        m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, scale s: Double,
        into k: UnsafeMutablePointer<Double>, context: LayerContext
    ) throws(TENGraDError) -> Double {
        let geo = geometry
        let groups = Double(geo.shape.groups), dm = Double(m), dl = Double(geo.positions)
        let pTilde = Double(geo.patch + (geo.shape.hasBias ? 1 : 0))
        factoredEstimate = groups * dm * dm * dl * dl * Double(geo.patch + geo.groupOut + 1)
        explicitEstimate = 2 * dm * dl * Double(geo.shape.outChannels * geo.patch) + dm * dm * Double(geo.shape.outChannels) * pTilde
        // Still to come after the Gram: the Cholesky factor (m² doubles) and the solve's 2m doubles.
        let available = workspaceFloats(context, reserve: (m * m + 2 * m) * MemoryLayout<Double>.stride)
        let plan = strategySetting != .auto ? strategySetting : (factoredEstimate < explicitEstimate ? .factored : .explicit)
        k.update(repeating: 0, count: m * m)
        let flops: Double
        switch plan {
        case .factored: flops = try factoredGram(m: m, a: a, g: g, into: k, available: available, context: context)
        default: flops = try explicitGram(m: m, a: a, g: g, into: k, available: available, context: context)
        }
        let s2 = s * s
        for i in 0..<(m * m) { k[i] *= s2 }
        chosen = plan == .factored ? .factored : .explicit
        return flops
    }

    /// Rows of one group's output gradient for sample i start here (C_out/groups rows of L).
    @inline(__always) private func gradRows(_ g: UnsafePointer<Float>, sample i: Int, group: Int) -> UnsafePointer<Float> {
        g + i * geometry.outputSize + group * geometry.groupOut * geometry.positions
    }

    /// Explicit strategy: per-sample gradients of a block of output channels for all m samples
    /// (U_blk, m × cb·P̃), then K += U_blk U_blkᵀ. When all of U (m × C_out·P̃) fits the
    /// workspace — often, since C_out·P̃ is usually smaller than a sample's activations and output
    /// gradients — it is formed in one piece, one syrk makes K, and it stays in the workspace for
    /// the one-call update (`applyKeptGradients`).
    private func explicitGram(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into k: UnsafeMutablePointer<Double>,
        available: Int, context: LayerContext
    ) throws(TENGraDError) -> Double {
        let geo = geometry, L = geo.positions, P = geo.patch, bias = geo.shape.hasBias, Cg = geo.groupOut
        let pT = P + (bias ? 1 : 0)
        let d = geo.shape.outChannels * pT
        // Workspace: Kf (m²) + U_blk (m·cb·P̃, or m·d whole) + patches of a chunk (P·mc·L).
        let mm = m * m
        // The patch block has P̃ rows: with a bias, a last row of ones makes the GEMM produce the
        // bias column Σ_l G_i[o, l] as well.
        let minimum = try checkedSum(try checkedSum(mm, try checkedProduct(m, pT, what: "batch × patch"), what: "workspace"),
                                     try checkedProduct(pT, L, what: "patch matrix"), what: "workspace")
        let room = max(available, minimum)
        let whole = (room - mm - pT * L) / m >= d  // all of U fits (m·d cannot overflow then)
        let cb = whole ? Cg : max(1, min(Cg, (room - mm - pT * L) / max(1, m * pT)))
        let blockWidth = whole ? d : cb * pT
        let mc = Conv2dLayer.chunk(m, fixed: mm + m * blockWidth, perSample: pT * L, available: room)
        let work = try context.workspace.floats(mm + m * blockWidth + pT * mc * L)
        let kf = work, u = work + mm, patches = u + m * blockWidth
        var flops = 0.0
        func accumulate(width: Int) {
            BLAS.gramLower(n: m, k: width, a: u, c: kf)
            for i in 0..<m {
                for j in 0...i {
                    let v = Double(kf[i * m + j])
                    k[i * m + j] += v
                    if i != j { k[j * m + i] += v }
                }
            }
            flops += Double(m) * Double(m + 1) * Double(width)
        }
        for group in 0..<geo.shape.groups {
            var o0 = 0
            while o0 < Cg {
                let n = min(cb, Cg - o0)
                // Column of this block inside a row of U: the whole row when U is kept entire.
                let column = whole ? group * Cg * pT : 0
                var i0 = 0
                while i0 < m {
                    let c = min(mc, m - i0)
                    for li in 0..<c { geo.unfold(sample: a + (i0 + li) * geo.inputSize, group: group, into: patches + li * L, ld: c * L) }
                    if bias { (patches + P * c * L).update(repeating: 1, count: c * L) }
                    for li in 0..<c {
                        let gi = gradRows(g, sample: i0 + li, group: group) + o0 * L
                        // [Δ | bias] (n × P̃) = G_i[o0..<o0+n] (n × L) · [Ĩ_i; 1]ᵀ (L × P̃).
                        BLAS.sgemm(transA: false, transB: true, m: n, n: pT, k: L, alpha: 1, a: gi, lda: L,
                                   b: patches + li * L, ldb: c * L, beta: 0, c: u + (i0 + li) * blockWidth + column, ldc: pT)
                    }
                    i0 += c
                }
                flops += 2 * Double(m * n * pT) * Double(L)
                if !whole { accumulate(width: n * pT) }
                o0 += n
            }
        }
        if whole { accumulate(width: d) }
        keptGradients = whole ? UnsafePointer(u) : nil
        return flops
    }

    /// Per-sample gradients (m × C_out·P̃, unscaled) left in the workspace by the last explicit
    /// Gram, until the workspace is used for anything else.
    private var keptGradients: UnsafePointer<Float>?

    /// The one-call update U c = s Σ_i c_i Δ_i straight from the kept per-sample gradients (one
    /// GEMV, m·C_out·P̃ flops, instead of unfolding the batch again).
    override func applyKeptGradients(
        m: Int, scale s: Double, c: UnsafePointer<Double>, weight: UnsafeMutablePointer<Float>,
        bias: UnsafeMutablePointer<Float>?, context: LayerContext
    ) throws(TENGraDError) -> Double? {
        guard let u = keptGradients else { return nil }
        let geo = geometry, P = geo.patch, pT = P + (geo.shape.hasBias ? 1 : 0), d = geo.shape.outChannels * pT
        let scratch = try Storage<Float>(count: m + d, budget: context.budget, what: "update scratch")
        let cs = scratch.base, out = scratch.base + m
        for i in 0..<m { cs[i] = Float(s * c[i]) }
        BLAS.sgemv(trans: true, m: m, n: d, alpha: 1, a: u, x: cs, beta: 0, y: out)
        for o in 0..<geo.shape.outChannels {
            (weight + o * P).update(from: out + o * pT, count: P)
            if let bias { bias[o] = out[o * pT + P] }
        }
        keptGradients = nil
        return 2 * Double(m) * Double(d)
    }

    /// Factored strategy: for sample blocks I ≤ J, M_I = Ĩ_Iᵀ Ĩ_J and M_G = G_Iᵀ G_J over all
    /// position pairs, then K_ij += Σ_{l,p} (M_I + bias) ∘ M_G over the (i, j) block.
    private func factoredGram(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into k: UnsafeMutablePointer<Double>,
        available: Int, context: LayerContext
    ) throws(TENGraDError) -> Double {
        keptGradients = nil
        let geo = geometry, L = geo.positions, P = geo.patch, Cg = geo.groupOut
        let one: Float = geo.shape.hasBias ? 1 : 0
        // Workspace per block of c samples: two patch blocks (P·c·L), two gradient blocks
        // (Cg·c·L) and the two products ((c·L)² each).
        let perSample = try checkedProduct(2, P + Cg, L, what: "factored workspace per sample")
        var c = max(1, min(m, (available / 2).squareRootFloor / max(1, L)))
        while c > 1 && c * perSample + 2 * (c * L) * (c * L) > available { c -= 1 }
        let cl = try checkedProduct(c, L, what: "block positions")
        let need = try checkedSum(try checkedProduct(c, perSample, what: "workspace"),
                                  try checkedProduct(2, cl, cl, what: "workspace"), what: "workspace")
        let work = try context.workspace.floats(need)
        let pI = work, pJ = pI + P * cl, gI = pJ + P * cl, gJ = gI + Cg * cl, mI = gJ + Cg * cl, mG = mI + cl * cl
        var flops = 0.0
        func stack(_ start: Int, _ count: Int, group: Int, patches: UnsafeMutablePointer<Float>, grads: UnsafeMutablePointer<Float>) {
            for li in 0..<count {
                geo.unfold(sample: a + (start + li) * geo.inputSize, group: group, into: patches + li * L, ld: count * L)
                let gi = gradRows(g, sample: start + li, group: group)
                for o in 0..<Cg { (grads + o * count * L + li * L).update(from: gi + o * L, count: L) }
            }
        }
        for group in 0..<geo.shape.groups {
            var i0 = 0
            while i0 < m {
                let ci = min(c, m - i0)
                stack(i0, ci, group: group, patches: pI, grads: gI)
                var j0 = i0
                while j0 < m {
                    let cj = min(c, m - j0)
                    let (pj, gj) = j0 == i0 ? (pI, gI) : (pJ, gJ)
                    if j0 != i0 { stack(j0, cj, group: group, patches: pJ, grads: gJ) }
                    let rows = ci * L, cols = cj * L
                    BLAS.sgemm(transA: true, transB: false, m: rows, n: cols, k: P, alpha: 1, a: pI, lda: rows,
                               b: pj, ldb: cols, beta: 0, c: mI, ldc: cols)
                    BLAS.sgemm(transA: true, transB: false, m: rows, n: cols, k: Cg, alpha: 1, a: gI, lda: rows,
                               b: gj, ldb: cols, beta: 0, c: mG, ldc: cols)
                    for li in 0..<ci {
                        for lj in 0..<cj where j0 != i0 || lj >= li {
                            var sum = 0.0
                            for l in 0..<L {
                                let offset = (li * L + l) * cols + lj * L
                                var partial: Float = 0
                                for p in 0..<L { partial += (mI[offset + p] + one) * mG[offset + p] }
                                sum += Double(partial)
                            }
                            let i = i0 + li, j = j0 + lj
                            k[i * m + j] += sum
                            if i != j { k[j * m + i] += sum }
                        }
                    }
                    flops += 2 * Double(rows) * Double(cols) * Double(P + Cg + 1)
                    j0 += cj
                }
                i0 += ci
            }
        }
        return flops
    }

    // MARK: - Uᵀv and U x

    /// True when `projectGradient` left the unfolded patches of the whole batch in the workspace
    /// (one group, one chunk), so the `applyU` that follows in `precondition` need not unfold again.
    private var patchesKept = false

    override func updateWorkspace(m: Int, context: LayerContext) throws(TENGraDError) -> Int {
        keptGradients = nil
        patchesKept = false
        let geo = geometry
        let perSample = try checkedProduct(geo.patch + geo.groupOut, geo.positions, what: "chunk workspace")
        updateChunk = Conv2dLayer.chunk(m, fixed: 0, perSample: perSample, available: workspaceFloats(context, reserve: 2 * m * MemoryLayout<Double>.stride))
        return try checkedProduct(updateChunk, perSample, what: "chunk workspace")
    }

    /// t_i = s Σ_γ ⟨G_iγ, V_γ Ĩ_iγ + b_γ 1ᵀ⟩ over sample chunks: T = V_γ Ĩ_chunk (one GEMM per group).
    override func projectGradient(
        m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, scale s: Double,
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        into t: UnsafeMutablePointer<Double>, workspace: UnsafeMutablePointer<Float>
    ) -> Double {
        let geo = geometry, L = geo.positions, P = geo.patch, Cg = geo.groupOut
        for i in 0..<m { t[i] = 0 }
        var i0 = 0
        while i0 < m {
            let c = min(updateChunk, m - i0)
            let patches = workspace, tm = workspace + P * c * L
            for group in 0..<geo.shape.groups {
                for li in 0..<c { geo.unfold(sample: a + (i0 + li) * geo.inputSize, group: group, into: patches + li * L, ld: c * L) }
                BLAS.sgemm(transA: false, transB: false, m: Cg, n: c * L, k: P, alpha: 1,
                           a: weightGrad + group * Cg * P, lda: P, b: patches, ldb: c * L, beta: 0, c: tm, ldc: c * L)
                for li in 0..<c {
                    let gi = gradRows(g, sample: i0 + li, group: group)
                    var dot = 0.0
                    for o in 0..<Cg {
                        let b = biasGrad.map { $0[group * Cg + o] } ?? 0
                        let trow = tm + o * c * L + li * L, grow = gi + o * L
                        var partial: Float = 0
                        for l in 0..<L { partial += (trow[l] + b) * grow[l] }
                        dot += Double(partial)
                    }
                    t[i0 + li] += s * dot
                }
            }
            i0 += c
        }
        patchesKept = geo.shape.groups == 1 && updateChunk >= m
        return 2 * Double(m) * Double(L) * Double(geo.shape.outChannels) * Double(P + 1)
    }

    /// W_γ ← β W_γ + Σ_chunks (α s x_i G_iγ)_stacked Ĩ_chunkᵀ, b_γ likewise (one GEMM per group and chunk).
    override func applyU(
        m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, scale s: Double,
        x: UnsafePointer<Double>, alpha: Double, beta: Float,
        weight: UnsafeMutablePointer<Float>, bias: UnsafeMutablePointer<Float>?, workspace: UnsafeMutablePointer<Float>
    ) -> Double {
        let geo = geometry, L = geo.positions, P = geo.patch, Cg = geo.groupOut
        let reusePatches = patchesKept
        patchesKept = false
        var i0 = 0
        while i0 < m {
            let c = min(updateChunk, m - i0)
            let patches = workspace, gs = workspace + P * c * L
            let firstBeta: Float = i0 == 0 ? beta : 1
            for group in 0..<geo.shape.groups {
                for li in 0..<c {
                    if !reusePatches {
                        geo.unfold(sample: a + (i0 + li) * geo.inputSize, group: group, into: patches + li * L, ld: c * L)
                    }
                    let w = Float(alpha * s * x[i0 + li])
                    let gi = gradRows(g, sample: i0 + li, group: group)
                    for o in 0..<Cg {
                        let dst = gs + o * c * L + li * L, src = gi + o * L
                        for l in 0..<L { dst[l] = w * src[l] }
                    }
                }
                BLAS.sgemm(transA: false, transB: true, m: Cg, n: P, k: c * L, alpha: 1, a: gs, lda: c * L,
                           b: patches, ldb: c * L, beta: firstBeta, c: weight + group * Cg * P, ldc: P)
                if let bias {
                    for o in 0..<Cg {
                        let row = gs + o * c * L
                        var sum: Float = 0
                        for l in 0..<(c * L) { sum += row[l] }
                        let j = group * Cg + o
                        bias[j] = (firstBeta == 0 ? 0 : firstBeta * bias[j]) + sum
                    }
                }
            }
            i0 += c
        }
        return 2 * Double(m) * Double(L) * Double(geo.shape.outChannels) * Double(P + 1)
    }
}

extension Int {
    /// ⌊√self⌋ for non-negative values.
    var squareRootFloor: Int {
        guard self > 0 else { return 0 }
        var r = Int(Double(self).squareRoot())
        while r * r > self { r -= 1 }
        while (r + 1) * (r + 1) <= self { r += 1 }
        return r
    }
}
