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
final class LinearLayer: ExactBlockLayer {
    let inFeatures: Int
    let outFeatures: Int
    let hasBias: Bool

    init(inFeatures: Int, outFeatures: Int, hasBias: Bool) throws(TENGraDError) {
        guard inFeatures > 0 else { throw .invalid("in_features must be positive, got \(inFeatures)") }
        guard outFeatures > 0 else { throw .invalid("out_features must be positive, got \(outFeatures)") }
        guard inFeatures <= BLAS.maxDimension, outFeatures <= BLAS.maxDimension else {
            throw .shape("in_features and out_features must be at most \(BLAS.maxDimension) (32-bit BLAS)")
        }
        self.inFeatures = inFeatures
        self.outFeatures = outFeatures
        self.hasBias = hasBias
        let weights = try checkedProduct(inFeatures, outFeatures, what: "in_features × out_features")
        try super.init(kind: .linear, weightCount: weights, biasCount: hasBias ? outFeatures : 0)
    }

    override func inputCounts(batch: Int) throws(TENGraDError) -> (activations: Int, outputGrads: Int) {
        guard batch > 0 else { throw .invalid("batch must be positive, got \(batch)") }
        guard batch <= BLAS.maxDimension else { throw .shape("batch \(batch) exceeds \(BLAS.maxDimension) (32-bit BLAS)") }
        return (
            try checkedProduct(batch, inFeatures, what: "batch × in_features"),
            try checkedProduct(batch, outFeatures, what: "batch × out_features")
        )
    }

    /// K = s² (AAᵀ + bias) ∘ (GGᵀ), from two float32 syrks, assembled in float64.
    override func buildGram(
        m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, scale s: Double,
        into k: UnsafeMutablePointer<Double>, context: LayerContext
    ) throws(TENGraDError) -> Double {
        let mm = m * m  // the caller allocated m² doubles, so this does not overflow
        let work = try context.workspace.floats(try checkedProduct(2, mm, what: "2·batch²"))
        let gramA = work, gramG = work + mm
        BLAS.gramLower(n: m, k: inFeatures, a: a, c: gramA)
        BLAS.gramLower(n: m, k: outFeatures, a: g, c: gramG)
        let s2 = s * s
        let one = hasBias ? 1.0 : 0.0
        for i in 0..<m {
            for j in 0...i {
                let v = s2 * (Double(gramA[i * m + j]) + one) * Double(gramG[i * m + j])
                k[i * m + j] = v
                k[j * m + i] = v
            }
        }
        let dm = Double(m)
        return dm * (dm + 1) * Double(inFeatures + outFeatures) + 3 * dm * dm
    }

    override func updateWorkspace(m: Int, context: LayerContext) throws(TENGraDError) -> Int {
        try checkedProduct(m, max(inFeatures, outFeatures), what: "batch × features")
    }

    /// T = G V (m×in), t_i = s (T_i · a_i + g_i · b).
    override func projectGradient(
        m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, scale s: Double,
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        into t: UnsafeMutablePointer<Double>, workspace: UnsafeMutablePointer<Float>
    ) -> Double {
        let inF = inFeatures, outF = outFeatures
        let work = workspace
        BLAS.sgemm(
            transA: false, transB: false, m: m, n: inF, k: outF,
            alpha: 1, a: g, lda: outF, b: weightGrad, ldb: inF, beta: 0, c: work, ldc: inF)
        for i in 0..<m {
            var dot = 0.0
            let ti = work + i * inF, ai = a + i * inF
            for k in 0..<inF { dot += Double(ti[k]) * Double(ai[k]) }
            if let biasGrad {
                let gi = g + i * outF
                for j in 0..<outF { dot += Double(gi[j]) * Double(biasGrad[j]) }
            }
            t[i] = s * dot
        }
        let dm = Double(m)
        return 2 * dm * Double(inF) * Double(outF) + 2 * dm * Double(inF + (hasBias ? outF : 0))
    }

    /// weight = β·weight + α s Gᵀ diag(x) A and bias = β·bias + α s Gᵀ x: the rows of G scaled
    /// into the workspace, then one GEMM whose β folds in the caller's scaling.
    override func applyU(
        m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, scale s: Double,
        x: UnsafePointer<Double>, alpha: Double, beta: Float,
        weight: UnsafeMutablePointer<Float>, bias: UnsafeMutablePointer<Float>?, workspace: UnsafeMutablePointer<Float>
    ) -> Double {
        let out = outFeatures
        let work = workspace
        for i in 0..<m {
            let w = Float(alpha * s * x[i])
            let src = g + i * out, dst = work + i * out
            for j in 0..<out { dst[j] = w * src[j] }
        }
        BLAS.sgemm(
            transA: true, transB: false, m: out, n: inFeatures, k: m,
            alpha: 1, a: work, lda: out, b: a, ldb: inFeatures, beta: beta, c: weight, ldc: inFeatures)
        if let bias {
            for j in 0..<out { bias[j] = beta == 0 ? 0 : beta * bias[j] }
            for i in 0..<m {
                let row = work + i * out
                for j in 0..<out { bias[j] += row[j] }
            }
        }
        let dm = Double(m)
        return 2 * dm * Double(inFeatures) * Double(out) + dm * Double(out) * (hasBias ? 2 : 1)
    }
}
