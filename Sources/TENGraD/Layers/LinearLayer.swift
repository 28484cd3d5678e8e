/// A fully connected layer `y = W a (+ b)`, `W ∈ R^{out×in}`, with its exact Fisher block.
///
/// Per-sample gradient (SPEC §2), bias as a joint last input column of ones:
///
///     u_i = s · g_i ⊗ ã_i,   ã_i = [a_i; 1] with bias, a_i without
///
/// The m×m Gram of the per-sample gradients is a Hadamard product of two small Grams,
///
///     K = UᵀU = s² (ÃÃᵀ) ∘ (GGᵀ),   ÃÃᵀ = AAᵀ (+ 1 with bias),
///
/// and the two products the Woodbury identity needs are GEMMs that never form U:
///
///     (Uᵀv)_i = s · g_iᵀ V ã_i        (T = G V, then row dots with Ã)
///     U x     = s · Gᵀ diag(x) Ã      (scale the rows of G, one GEMM with A)
///
/// The snapshot keeps A (m×in), G (m×out), K and the factor of K + mλI: m·(in + out) floats and
/// 2m² doubles, never in·out.
final class LinearLayer: PreconditionedLayer {
    let inFeatures: Int
    let outFeatures: Int
    let hasBias: Bool

    private var snapshot: Snapshot?
    /// Statistics recorded by the calls; `stats` adds the lazily computed condition estimate.
    private var record: LayerStats

    var updateDotGrad: Double? { record.hasUpdate ? record.updateDotGrad : nil }

    var stats: LayerStats {
        var s = record
        s.rcond = snapshot?.system.rcond ?? 0
        return s
    }

    private struct Snapshot {
        let m: Int
        let activations: Storage<Float>  // A, m×in
        let outputGrads: Storage<Float>  // G, m×out
        let scale: Float
        /// max |ã_ij| (1 counts when there is a bias) and max |g_ij|, for the overflow bound.
        let maxActivation: Float
        let maxOutputGrad: Float
        let system: DampedSystem
    }

    init(inFeatures: Int, outFeatures: Int, hasBias: Bool) throws(TENGraDError) {
        guard inFeatures > 0 else { throw .invalid("in_features must be positive, got \(inFeatures)") }
        guard outFeatures > 0 else { throw .invalid("out_features must be positive, got \(outFeatures)") }
        guard inFeatures <= BLAS.maxDimension, outFeatures <= BLAS.maxDimension else {
            throw .shape("in_features and out_features must be at most \(BLAS.maxDimension) (32-bit BLAS)")
        }
        let weights = try checkedProduct(inFeatures, outFeatures, what: "in_features × out_features")
        let parameters = try checkedSum(weights, hasBias ? outFeatures : 0, what: "parameter count")
        self.inFeatures = inFeatures
        self.outFeatures = outFeatures
        self.hasBias = hasBias
        self.record = LayerStats(kind: .linear, parameters: parameters)
    }

    var kind: LayerKind { .linear }
    var weightCount: Int { inFeatures * outFeatures }
    var biasCount: Int { hasBias ? outFeatures : 0 }

    func inputCounts(batch: Int) throws(TENGraDError) -> (activations: Int, outputGrads: Int) {
        guard batch > 0 else { throw .invalid("batch must be positive, got \(batch)") }
        guard batch <= BLAS.maxDimension else { throw .shape("batch \(batch) exceeds \(BLAS.maxDimension) (32-bit BLAS)") }
        return (
            try checkedProduct(batch, inFeatures, what: "batch × in_features"),
            try checkedProduct(batch, outFeatures, what: "batch × out_features")
        )
    }

    // MARK: - Curvature

    /// A checked batch, its new m×m system, and storage for the snapshot copies: everything that
    /// can fail, done before any state or output is touched.
    private struct Prepared {
        let m: Int
        let activations: Storage<Float>
        let outputGrads: Storage<Float>
        let maxActivation: Float
        let maxOutputGrad: Float
        let system: DampedSystem
        let flops: Double
        let workspaceBytes: Int
    }

    private func prepare(
        batch m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>,
        scale s: Float, context: LayerContext
    ) throws(TENGraDError) -> Prepared {
        let (countA, countG) = try inputCounts(batch: m)
        let scanA = ArrayScan(a, count: countA)
        guard scanA.finite else { throw TENGraDError(.notFinite, "activations contain NaN or Inf") }
        let scanG = ArrayScan(g, count: countG)
        guard scanG.finite else { throw TENGraDError(.notFinite, "output_grads contain NaN or Inf") }

        // Gram K = s² (AAᵀ + bias) ∘ (GGᵀ), from two float32 syrks, assembled in float64.
        let mm = try checkedProduct(m, m, what: "batch²")
        let gram = try Storage<Double>(count: mm, budget: context.budget, what: "Gram (\(m)×\(m) doubles)")
        let work = try context.workspace.floats(try checkedProduct(2, mm, what: "2·batch²"))
        let gramA = work, gramG = work + mm
        BLAS.gramLower(n: m, k: inFeatures, a: a, c: gramA)
        BLAS.gramLower(n: m, k: outFeatures, a: g, c: gramG)
        let s2 = Double(s) * Double(s)
        let one = hasBias ? 1.0 : 0.0
        let k = gram.base
        var finite = true
        for i in 0..<m {
            for j in 0...i {
                let v = s2 * (Double(gramA[i * m + j]) + one) * Double(gramG[i * m + j])
                finite = finite && v.isFinite
                k[i * m + j] = v
                k[j * m + i] = v
            }
        }
        guard finite else {
            throw TENGraDError(.numerical, "the Gram of the per-sample gradients overflows (inputs too large)")
        }
        let system = try DampedSystem(gram: gram, m: m, damping: context.damping, budget: context.budget)

        // Snapshot storage: reuse the current one when the batch size is unchanged.
        let activations: Storage<Float>, outputGrads: Storage<Float>
        if let old = snapshot, old.m == m {
            activations = old.activations
            outputGrads = old.outputGrads
        } else {
            activations = try Storage<Float>(count: countA, budget: context.budget, what: "snapshot activations")
            outputGrads = try Storage<Float>(count: countG, budget: context.budget, what: "snapshot output gradients")
        }
        let dm = Double(m)
        let flops = dm * (dm + 1) * Double(inFeatures + outFeatures) + 3 * dm * dm + system.factorFlops
        return Prepared(
            m: m, activations: activations, outputGrads: outputGrads,
            maxActivation: max(scanA.maxAbs, hasBias ? 1 : 0), maxOutputGrad: scanG.maxAbs,
            system: system, flops: flops, workspaceBytes: context.workspace.bytes)
    }

    /// Copies the batch into the snapshot and makes it current. Cannot fail.
    private func commit(_ p: Prepared, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, scale: Float) {
        p.activations.base.update(from: a, count: p.activations.count)
        p.outputGrads.base.update(from: g, count: p.outputGrads.count)
        snapshot = Snapshot(
            m: p.m, activations: p.activations, outputGrads: p.outputGrads, scale: scale,
            maxActivation: p.maxActivation, maxOutputGrad: p.maxOutputGrad, system: p.system)
        record.batch = p.m
        record.snapshotBytes = p.activations.bytes + p.outputGrads.bytes + p.system.bytes
        record.workspaceBytes = p.workspaceBytes
        record.damping = p.system.damping
        record.jitter = p.system.jitter
        record.curvatureFlops = p.flops
    }

    func updateCurvature(
        batch: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>,
        scale: Float, context: LayerContext
    ) throws(TENGraDError) {
        let start = monotonicSeconds()
        let prepared = try prepare(batch: batch, activations: activations, outputGrads: outputGrads, scale: scale, context: context)
        commit(prepared, activations: activations, outputGrads: outputGrads, scale: scale)
        record.curvatureSeconds = monotonicSeconds() - start
    }

    // MARK: - Updates

    /// Writes `weight = α · Gᵀ diag(x) A + β · weight` and `bias = α · Gᵀ x + β · bias`, with G
    /// rows scaled into the workspace (the one GEMM of `U x`).
    private func applyU(
        x: UnsafePointer<Double>, alpha: Double, m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>,
        beta: Float, weight: UnsafeMutablePointer<Float>, bias: UnsafeMutablePointer<Float>?,
        workspace: UnsafeMutablePointer<Float>
    ) {
        let out = outFeatures
        for i in 0..<m {
            let w = Float(alpha * x[i])
            let src = g + i * out, dst = workspace + i * out
            for j in 0..<out { dst[j] = w * src[j] }
        }
        BLAS.sgemm(
            transA: true, transB: false, m: out, n: inFeatures, k: m,
            alpha: 1, a: workspace, lda: out, b: a, ldb: inFeatures, beta: beta, c: weight, ldc: inFeatures)
        if let bias {
            for j in 0..<out { bias[j] = beta == 0 ? 0 : beta * bias[j] }
            for i in 0..<m {
                let row = workspace + i * out
                for j in 0..<out { bias[j] += row[j] }
            }
        }
    }

    func naturalGradient(
        batch: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>,
        scale s: Float, weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext
    ) throws(TENGraDError) {
        let start = monotonicSeconds()
        let p = try prepare(batch: batch, activations: activations, outputGrads: outputGrads, scale: s, context: context)
        let middle = monotonicSeconds()
        let m = p.m
        // c = (K + mλI)⁻¹ 1; the update of the mean gradient is U c (SPEC §2, empirical fast path).
        let c = try context.workspace.doubles(m)
        for i in 0..<m { c[i] = 1 }
        p.system.solve(c)
        var sumC = 0.0, sumAbsC = 0.0
        for i in 0..<m {
            sumC += c[i]
            sumAbsC += abs(c[i])
        }
        let bound = Double(s) * Double(p.maxOutputGrad) * Double(p.maxActivation) * sumAbsC
        guard sumAbsC.isFinite, bound <= safeMagnitude else {
            throw TENGraDError(.numerical, "the natural-gradient update would overflow float32 (bound \(bound))")
        }
        let work = try context.workspace.floats(try checkedProduct(m, outFeatures, what: "batch × out_features"))
        applyU(
            x: c, alpha: Double(s), m: m, a: activations, g: outputGrads, beta: 0,
            weight: weightUpdate, bias: biasUpdate, workspace: work)
        commit(p, activations: activations, outputGrads: outputGrads, scale: s)
        let end = monotonicSeconds()
        let dm = Double(m)
        record.curvatureSeconds = middle - start
        record.updateSeconds = end - middle
        record.updateFlops = 2 * dm * Double(inFeatures) * Double(outFeatures) + dm * Double(outFeatures) * (hasBias ? 2 : 1) + 2 * dm * dm
        // ⟨U c, U 1/m⟩ = (1/m) 1ᵀ K c = 1 − λ Σc, since (K + mλI) c = 1.
        record.updateDotGrad = 1 - p.system.damping * sumC
        record.hasUpdate = true
    }

    func precondition(
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext
    ) throws(TENGraDError) {
        guard let snap = snapshot else {
            throw TENGraDError(.state, "precondition before any curvature update on this layer")
        }
        let start = monotonicSeconds()
        let scanW = GradientScan(weightGrad, count: weightCount)
        guard scanW.finite else { throw TENGraDError(.notFinite, "weight_grad contains NaN or Inf") }
        var scanB = GradientScan.empty
        if let biasGrad {
            scanB = GradientScan(biasGrad, count: outFeatures)
            guard scanB.finite else { throw TENGraDError(.notFinite, "bias_grad contains NaN or Inf") }
        }
        try snap.system.refactor(damping: context.damping, budget: context.budget)
        let m = snap.m, inF = inFeatures, outF = outFeatures
        let a = snap.activations.base, g = snap.outputGrads.base
        let s = Double(snap.scale)
        let work = try context.workspace.floats(try checkedProduct(m, max(inF, outF), what: "batch × features"))
        let t = try context.workspace.doubles(try checkedProduct(2, m, what: "2·batch"))
        let tCopy = t + m

        // t = Uᵀv: T = G V (m×in), t_i = s (T_i · a_i + g_i · b).
        BLAS.sgemm(
            transA: false, transB: false, m: m, n: inF, k: outF,
            alpha: 1, a: g, lda: outF, b: weightGrad, ldb: inF, beta: 0, c: work, ldc: inF)
        var finite = true
        for i in 0..<m {
            var dot = 0.0
            let ti = work + i * inF, ai = a + i * inF
            for k in 0..<inF { dot += Double(ti[k]) * Double(ai[k]) }
            if let biasGrad {
                let gi = g + i * outF
                for j in 0..<outF { dot += Double(gi[j]) * Double(biasGrad[j]) }
            }
            t[i] = s * dot
            finite = finite && t[i].isFinite
        }
        guard finite else { throw TENGraDError(.numerical, "Uᵀ·grad overflows (gradient too large)") }
        var tDotV = 0.0
        let x = t  // solved in place: x = (K + mλI)⁻¹ t
        tCopy.update(from: t, count: m)
        snap.system.solve(x)
        var sumAbsX = 0.0
        for i in 0..<m {
            sumAbsX += abs(x[i])
            tDotV += tCopy[i] * x[i]
        }
        let λ = snap.system.damping
        let maxV = max(scanW.maxAbs, scanB.maxAbs)
        let bound = (maxV + s * Double(snap.maxOutputGrad) * Double(snap.maxActivation) * sumAbsX) / λ
        guard sumAbsX.isFinite, bound <= safeMagnitude else {
            throw TENGraDError(.numerical, "the preconditioned update would overflow float32 (bound \(bound))")
        }
        // update = (1/λ) v − (s/λ) Gᵀ diag(x) Ã, accumulated onto a copy of v by the GEMM's β.
        if UnsafePointer(weightUpdate) != weightGrad { weightUpdate.update(from: weightGrad, count: weightCount) }
        if let biasUpdate, let biasGrad, UnsafePointer(biasUpdate) != biasGrad { biasUpdate.update(from: biasGrad, count: outF) }
        applyU(
            x: x, alpha: -s / λ, m: m, a: a, g: g, beta: Float(1 / λ),
            weight: weightUpdate, bias: biasUpdate, workspace: work)
        let dm = Double(m)
        record.damping = λ
        record.jitter = snap.system.jitter
        record.updateSeconds = monotonicSeconds() - start
        record.updateFlops = 4 * dm * Double(inF) * Double(outF) + 2 * dm * dm + 4 * dm * Double(outF) * (hasBias ? 1 : 0)
        // ⟨update, v⟩ = (1/λ)(‖v‖² − tᵀ x).
        record.updateDotGrad = (scanW.sumSquares + scanB.sumSquares - tDotV) / λ
        record.hasUpdate = true
    }
}
