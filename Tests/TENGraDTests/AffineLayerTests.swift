import Testing
@testable import TENGraD

/// The affine kind (LayerNorm / RMSNorm's γ, β): y = γ ∘ x̂ + β over T tokens, against the oracle
/// built from u_i = s [Σ_t mask_it g_it ∘ x̂_it, Σ_t mask_it g_it] by direct summation.
@Suite struct AffineLayerTests {
    static func oracle(_ x: [Float], _ g: [Float], m: Int, T: Int, D: Int, bias: Bool, mask: [UInt8]?, scale: Double) -> DenseOracle {
        var rows: [[Double]] = []
        for i in 0..<m {
            var w = [Double](repeating: 0, count: D), b = [Double](repeating: 0, count: D)
            for t in 0..<T where (mask?[i * T + t] ?? 1) == 1 {
                for f in 0..<D {
                    let k = (i * T + t) * D + f
                    w[f] += scale * Double(g[k]) * Double(x[k])
                    b[f] += scale * Double(g[k])
                }
            }
            rows.append(bias ? w + b : w)
        }
        return DenseOracle(rows: rows)
    }

    static func flat(_ w: [Float], _ b: [Float]?) -> [Double] { (w + (b ?? [])).map(Double.init) }

    @Test(arguments: [ConvStrategy.auto, .factored, .explicit], [SnapshotRepresentation.auto, .raw, .perSample])
    func matchesOracle(strategy: ConvStrategy, representation: SnapshotRepresentation) throws {
        let D = 5
        for bias in [true, false] {
            let p = Preconditioner()
            try p.setDamping(0.05)
            let layer = try p.addAffine(features: D, bias: bias)
            try p.setConvStrategy(layer: layer, strategy)
            try p.setSnapshotRepresentation(layer: layer, representation)
            var rng = SeededRandom(bias ? 11 : 12)
            for (m, T, padded) in [(6, 1, false), (4, 3, true), (4, 5, false), (7, 2, false)] {
                let x = rng.array(m * T * D), g = rng.array(m * T * D)
                let mask: [UInt8]? = padded ? (0..<(m * T)).map { ($0 % T) < T - ($0 / T) % T ? 1 : 0 } : nil
                let o = Self.oracle(x, g, m: m, T: T, D: D, bias: bias, mask: mask, scale: 3)
                let (w, b) = try p.naturalGradient(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: mask, gradScale: 3)
                #expect(relativeError(Self.flat(w, b), o.solve(damping: 0.05, o.meanGradient)) <= tolerance)
                let s = try p.stats(layer: layer)
                #expect(s.kind == .affine && s.parameters == (bias ? 2 : 1) * D && s.batch == m)
                #expect(s.representation == (representation == .auto ? .perSample : representation))
                #expect(s.convStrategy == (strategy == .auto ? .explicit : strategy))
                let vw = rng.array(D), vb: [Float]? = bias ? rng.array(D) : nil
                try p.updateCurvature(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: mask, gradScale: 3)
                let (w2, b2) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
                #expect(relativeError(Self.flat(w2, b2), o.solve(damping: 0.05, Self.flat(vw, vb))) <= tolerance)
                // The per-sample gradients are the oracle's rows.
                let rows = try p.perSampleGradients(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: mask, gradScale: 3)
                #expect(relativeError(rows.map(Double.init), o.u.flatMap { $0 }) <= 1e-6)
                // Saved and restored: the same update.
                let q = Preconditioner()
                try q.loadState(p.saveState())
                #expect(try q.layerDescription(layer: layer) == .affine(features: D, bias: bias))
                #expect(try q.precondition(layer: layer, weightGrad: vw, biasGrad: vb) == (w2, b2))
            }
        }
    }

    /// A memory limit too small for all of U at once: the explicit Gram goes feature block by
    /// feature block through the kernel's generic per-group path — still the oracle's answer.
    @Test func blockwiseUnderMemoryLimit() throws {
        let m = 8, T = 3, D = 40
        var rng = SeededRandom(5)
        let x = rng.array(m * T * D), g = rng.array(m * T * D)
        let o = Self.oracle(x, g, m: m, T: T, D: D, bias: true, mask: nil, scale: 1)
        let p = Preconditioner()
        let layer = try p.addAffine(features: D, bias: true)
        try p.setSnapshotRepresentation(layer: layer, .raw)
        // Raw copies 7680 bytes, Gram and factor 1024, solve 128: about 1.5 KB left for a workspace
        // that would need 2.8 KB to hold U whole.
        try p.setMemoryLimit(10_400)
        let (w, b) = try p.naturalGradient(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: nil, gradScale: 1)
        #expect(relativeError(Self.flat(w, b), o.solve(damping: 0.1, o.meanGradient)) <= tolerance)
        #expect(try p.stats(layer: layer).workspaceBytes < 4 * m * 2 * D)  // U was never whole
    }

    /// Per-token mode equals the flattened batch; bad input is refused and changes nothing.
    @Test func perTokenAndBadInput() throws {
        let m = 3, T = 4, D = 3
        var rng = SeededRandom(9)
        let x = rng.array(m * T * D), g = rng.array(m * T * D)
        let p = Preconditioner(), q = Preconditioner()
        let l = try p.addAffine(features: D, bias: true)
        _ = try q.addAffine(features: D, bias: true)
        try p.setTokenMode(layer: l, .perToken)
        let got = try p.naturalGradient(layer: l, batch: m, tokens: T, activations: x, outputGrads: g, mask: nil, gradScale: 2)
        let want = try q.naturalGradient(layer: l, batch: m * T, activations: x, outputGrads: g, gradScale: 2)
        #expect(got == want)
        let before = p.saveState()
        var bad = x
        bad[4] = .nan
        refused(.notFinite) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: m, tokens: T, activations: bad, outputGrads: g, mask: nil, gradScale: 1) }
        refused(.shape) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: m, tokens: T, activations: Array(x.dropLast()), outputGrads: g, mask: nil, gradScale: 1) }
        refused(.shape) { () throws(TENGraDError) in _ = try p.precondition(layer: l, weightGrad: rng.array(D + 1), biasGrad: rng.array(D)) }
        refused(.invalidArgument) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: m, tokens: T, activations: x, outputGrads: g, mask: [UInt8](repeating: 0, count: m * T), gradScale: 1) }
        refused(.invalidArgument) { () throws(TENGraDError) in _ = try p.addAffine(features: 0, bias: true) }
        #expect(p.saveState() == before)
        #expect(p.layerCount == 1)
    }
}
