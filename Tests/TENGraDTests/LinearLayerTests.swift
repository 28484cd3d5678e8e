import Testing
@testable import TENGraD

/// Tolerance: relative 2-norm error ≤ 1e-3, the contract's bound for float32 inputs, λ ≥ 0.01 and
/// unit-scale data. Grams and GEMMs run in float32 (≈ 6e-8·√k rounding per entry), the m×m system
/// in float64; the observed errors are around 1e-6.
let tolerance = 1e-3

struct Case: CustomTestStringConvertible, Sendable {
    var m: Int, inFeatures: Int, outFeatures: Int, bias: Bool
    var testDescription: String { "m=\(m) in=\(inFeatures) out=\(outFeatures) bias=\(bias)" }
}

// m < d, m > d, batch 1, single-feature layers; bias on and off.
let cases: [Case] = [(4, 6, 5), (40, 5, 3), (1, 7, 4), (12, 12, 12), (9, 1, 1)].flatMap { s in
    [true, false].map { Case(m: s.0, inFeatures: s.1, outFeatures: s.2, bias: $0) }
}

@Suite struct LinearLayerTests {
    @Test(arguments: cases, [0.01, 0.1, 2.0])
    func naturalGradientMatchesOracle(_ c: Case, damping: Double) throws {
        var rng = SeededRandom(UInt64(c.m * 131 + c.inFeatures * 7 + c.outFeatures))
        let a = rng.array(c.m * c.inFeatures), g = rng.array(c.m * c.outFeatures)
        // Sum-reduced (s = 1, per-sample g) and mean-reduced (s = m, the caller holds g/m) losses:
        // the same unit-scale per-sample gradients either way.
        for scale in [Float(1), Float(c.m)] {
          for representation in [SnapshotRepresentation.auto, .raw, .perSample] {
            let given = g.map { $0 / scale }
            let p = Preconditioner()
            try p.setDamping(damping)
            let layer = try p.addLinear(inFeatures: c.inFeatures, outFeatures: c.outFeatures, bias: c.bias)
            try p.setSnapshotRepresentation(layer: layer, representation)
            let (w, b) = try p.naturalGradient(layer: layer, batch: c.m, activations: a, outputGrads: given, gradScale: scale)
            #expect((b == nil) == !c.bias)
            let oracle = DenseOracle(activations: a, outputGrads: given, batch: c.m, inFeatures: c.inFeatures,
                                     outFeatures: c.outFeatures, bias: c.bias, scale: Double(scale))
            let want = oracle.solve(damping: damping, oracle.meanGradient)
            #expect(relativeError(joined(w, b, out: c.outFeatures, in: c.inFeatures), want) <= tolerance)
            // A linear layer keeps the raw batch unless told otherwise (L = 1: U is never cheaper).
            #expect(try p.stats(layer: layer).representation == (representation == .perSample ? .perSample : .raw))
          }
        }
    }

    @Test(arguments: cases, [0.01, 0.1, 2.0])
    func preconditionMatchesOracle(_ c: Case, damping: Double) throws {
        var rng = SeededRandom(UInt64(c.m * 17 + c.inFeatures * 3 + c.outFeatures + 99))
        let a = rng.array(c.m * c.inFeatures), g = rng.array(c.m * c.outFeatures)
        let vw = rng.array(c.inFeatures * c.outFeatures)
        let vb: [Float]? = c.bias ? rng.array(c.outFeatures) : nil
        for representation in [SnapshotRepresentation.raw, .perSample] {
        let p = Preconditioner()
        try p.setDamping(damping)
        let layer = try p.addLinear(inFeatures: c.inFeatures, outFeatures: c.outFeatures, bias: c.bias)
        try p.setSnapshotRepresentation(layer: layer, representation)
        try p.updateCurvature(layer: layer, batch: c.m, activations: a, outputGrads: g, gradScale: 0.5)
        #expect(try p.stats(layer: layer).representation == representation)
        let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        let oracle = DenseOracle(activations: a, outputGrads: g, batch: c.m, inFeatures: c.inFeatures,
                                 outFeatures: c.outFeatures, bias: c.bias, scale: 0.5)
        let want = oracle.solve(damping: damping, joined(vw, vb, out: c.outFeatures, in: c.inFeatures))
        #expect(relativeError(joined(w, b, out: c.outFeatures, in: c.inFeatures), want) <= tolerance)

        // In place through the buffer API: the update overwrites the gradient it reads.
        var inPlaceW = vw, inPlaceB = vb ?? []
        try inPlaceW.withUnsafeMutableBufferPointer { wp in
            try inPlaceB.withUnsafeMutableBufferPointer { bp in
                try p.precondition(
                    layer: layer, weightGrad: UnsafeBufferPointer(wp), biasGrad: c.bias ? UnsafeBufferPointer(bp) : nil,
                    weightUpdate: wp, biasUpdate: c.bias ? bp : nil)
            }
        }
        #expect(inPlaceW == w)
        if let b { #expect(inPlaceB == b) }
        }
    }

    @Test func changingDampingRefactorizesWithoutNewData() throws {
        var rng = SeededRandom(5)
        let a = rng.array(8 * 4), g = rng.array(8 * 3), v = rng.array(12)
        let p = Preconditioner()
        let layer = try p.addLinear(inFeatures: 4, outFeatures: 3, bias: false)
        try p.updateCurvature(layer: layer, batch: 8, activations: a, outputGrads: g, gradScale: 1)
        let oracle = DenseOracle(activations: a, outputGrads: g, batch: 8, inFeatures: 4, outFeatures: 3, bias: false, scale: 1)
        for damping in [1.0, 0.03, 0.5] {
            try p.setDamping(damping)
            let (w, _) = try p.precondition(layer: layer, weightGrad: v, biasGrad: nil)
            #expect(relativeError(w.map(Double.init), oracle.solve(damping: damping, v.map(Double.init))) <= tolerance)
            #expect(try p.stats(layer: layer).damping == damping)
        }
    }

    @Test func statsDescribeTheSnapshot() throws {
        var rng = SeededRandom(6)
        let p = Preconditioner()
        let layer = try p.addLinear(inFeatures: 10, outFeatures: 6, bias: true)
        #expect(try p.stats(layer: layer).batch == 0)
        _ = try p.naturalGradient(layer: layer, batch: 16, activations: rng.array(160), outputGrads: rng.array(96), gradScale: 1)
        let s = try p.stats(layer: layer)
        #expect(s.kind == .linear && s.batch == 16 && s.parameters == 66)
        #expect(s.jitter == 0 && s.rcond > 0 && s.rcond <= 1)
        // Snapshot: m(in + out) floats and two m×m double matrices, never in·out.
        #expect(s.snapshotBytes == 4 * 16 * 16 + 2 * 8 * 16 * 16)
        #expect(s.hasUpdate && s.updateDotGrad > 0)
    }
}

/// A linear layer applied over T tokens (inputs [m][T][in]): the per-sequence block, the kernel's
/// position-major path with L = T > 1, both strategies and representations, against the oracle
/// built from u_i = s Σ_t g_{i,t} ã_{i,t}ᵀ by direct summation.
@Suite struct TokenLinearTests {
    @Test(arguments: [ConvStrategy.factored, .explicit], [SnapshotRepresentation.raw, .perSample])
    func perSequenceBlockMatchesOracle(strategy: ConvStrategy, representation: SnapshotRepresentation) throws {
        let m = 5, T = 4, inF = 3, outF = 2
        for bias in [true, false] {
            var rng = SeededRandom(77)
            let a = rng.array(m * T * inF), g = rng.array(m * T * outF)
            let width = inF + (bias ? 1 : 0)
            var rows: [[Double]] = []
            for i in 0..<m {
                var row = [Double](repeating: 0, count: outF * width)
                for t in 0..<T {
                    for o in 0..<outF {
                        let go = 1.5 * Double(g[(i * T + t) * outF + o])
                        for c in 0..<width { row[o * width + c] += go * (c < inF ? Double(a[(i * T + t) * inF + c]) : 1) }
                    }
                }
                rows.append(row)
            }
            let oracle = DenseOracle(rows: rows)
            let p = Preconditioner()
            let layer = try p.append(ExactBlock(LinearGeometry(inFeatures: inF, outFeatures: outF, hasBias: bias, tokens: T)))
            p.layers[layer].strategySetting = strategy
            try p.setSnapshotRepresentation(layer: layer, representation)
            let (w, b) = try p.naturalGradient(layer: layer, batch: m, activations: a, outputGrads: g, gradScale: 1.5)
            #expect(relativeError(joined(w, b, out: outF, in: inF), oracle.solve(damping: 0.1, oracle.meanGradient)) <= tolerance)
            #expect(try p.stats(layer: layer).representation == representation)
            let vw = rng.array(outF * inF), vb: [Float]? = bias ? rng.array(outF) : nil
            let (w2, b2) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
            let want = oracle.solve(damping: 0.1, joined(vw, vb, out: outF, in: inF))
            #expect(relativeError(joined(w2, b2, out: outF, in: inF), want) <= tolerance)
        }
    }
}
