import Testing
@testable import TENGraD

/// Relative damping (docs/DESIGN.md §16): a layer reads λ as λ · tr(F)/min(m, d) of each snapshot
/// (with a base, of E⁻¹F), against the dense oracle with that λ; a new λ re-factorizes; the mode
/// survives saved state; a zero block keeps λ.
@Suite struct RelativeDampingTests {
    /// tr(F)/min(m, d) of the oracle's rows, optionally in the metric of a base e.
    static func averageEigenvalue(_ o: DenseOracle, base e: [Double]? = nil) -> Double {
        var trace = 0.0
        for row in o.u { for k in 0..<o.d { trace += row[k] * row[k] / (e?[k] ?? 1) } }
        return trace / Double(o.u.count) / Double(min(o.u.count, o.d))
    }

    @Test(arguments: [SnapshotRepresentation.raw, .perSample])
    func matchesOracle(representation: SnapshotRepresentation) throws {
        for (name, c) in DiagonalBaseTests.cases() {
            for withBase in [false, true] {
                var rng = SeededRandom(21)
                let p = Preconditioner()
                try p.setDamping(0.3)
                let layer = try c.add(p)
                try p.setSnapshotRepresentation(layer: layer, representation)
                try p.setDampingMode(layer: layer, .relative)
                #expect(try p.dampingMode(layer: layer) == .relative)
                let counts = try p.arrayCounts(layer: layer, batch: 0)
                var e: [Double]?
                if withBase {
                    let ew = DiagonalBaseTests.base(&rng, counts.weight)
                    let eb: [Float]? = counts.bias > 0 ? DiagonalBaseTests.base(&rng, counts.bias) : nil
                    try p.setBase(layer: layer, weightBase: ew, biasBase: eb)
                    e = c.order(ew, eb)
                }
                try p.updateCurvature(layer: layer, batch: c.m, tokens: c.tokens, activations: c.a, outputGrads: c.g,
                                      mask: c.mask, gradScale: c.scale)
                let scale = Self.averageEigenvalue(c.oracle, base: e)
                #expect(abs(try p.stats(layer: layer).damping - 0.3 * scale) <= 1e-6 * 0.3 * scale, "\(name)")
                let vw = rng.array(counts.weight), vb: [Float]? = counts.bias > 0 ? rng.array(counts.bias) : nil
                let v = c.order(vw, vb)
                let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
                #expect(relativeError(c.order(w, b), c.oracle.solve(damping: 0.3 * scale, base: e, v)) <= tolerance, "\(name)")
                // A new λ: the same factor, re-factorized.
                try p.setDamping(0.05)
                let (w2, b2) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
                #expect(relativeError(c.order(w2, b2), c.oracle.solve(damping: 0.05 * scale, base: e, v)) <= tolerance,
                        "\(name)")
                // Saved state keeps the mode and the snapshot's factor: the same bits.
                let q = Preconditioner()
                try q.loadState(p.saveState())
                #expect(try q.dampingMode(layer: layer) == .relative)
                #expect(try q.precondition(layer: layer, weightGrad: vw, biasGrad: vb) == (w2, b2))
                // The one-call update uses the factor of its own batch.
                let (w3, b3) = try p.naturalGradient(layer: layer, batch: c.m, tokens: c.tokens, activations: c.a,
                                                     outputGrads: c.g, mask: c.mask, gradScale: c.scale)
                #expect(relativeError(c.order(w3, b3), c.oracle.solve(damping: 0.05 * scale, base: e, c.oracle.meanGradient))
                        <= tolerance, "\(name)")
            }
        }
    }

    @Test func zeroBlockKeepsLambdaAndTheModeTakesEffectAtTheNextSnapshot() throws {
        let p = Preconditioner()
        let layer = try p.addLinear(inFeatures: 3, outFeatures: 2, bias: true)
        try p.setDampingMode(layer: layer, .relative)
        try p.updateCurvature(layer: layer, batch: 2, activations: [Float](repeating: 1, count: 6),
                              outputGrads: [Float](repeating: 0, count: 4), gradScale: 1)
        #expect(try p.stats(layer: layer).damping == Preconditioner.defaultDamping)
        let v: [Float] = [1, 2, 3, 4, 5, 6]
        let (w, _) = try p.precondition(layer: layer, weightGrad: v, biasGrad: [1, 1])
        #expect(relativeError(w.map(Double.init), v.map { Double($0) / Preconditioner.defaultDamping }) <= 1e-6)
        // Switching back to absolute leaves the current snapshot's factor until the next refresh.
        var rng = SeededRandom(3)
        let a = rng.array(6), g = rng.array(4)
        try p.updateCurvature(layer: layer, batch: 2, activations: a, outputGrads: g, gradScale: 1)
        let relative = try p.stats(layer: layer).damping
        try p.setDampingMode(layer: layer, .absolute)
        #expect(try p.stats(layer: layer).damping == relative)
        try p.updateCurvature(layer: layer, batch: 2, activations: a, outputGrads: g, gradScale: 1)
        #expect(try p.stats(layer: layer).damping == Preconditioner.defaultDamping)
    }
}
