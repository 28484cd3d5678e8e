import Testing
@testable import TENGraD

/// `preconditionPrepare` + `preconditionFinish` (ExactBlock+Precondition.swift): at scale 1 the
/// one-call precondition's bits on every path (OpenBLAS's and the fused linear one, raw and kept
/// per-sample snapshots, convolutions, a diagonal base), a scale against the dense float64 oracle,
/// layers prepared in turn before any finishes (each keeps its own x), ⟨update, grad⟩ for KL
/// clipping (the unscaled update's, after the finish too), and the refusals that leave the first phase and the outputs as they were.
@Suite(.serialized) struct TwoPhaseTests {
    struct Case {
        let name: String
        let fused: Bool
        let representation: SnapshotRepresentation
        let base: Bool
    }

    static let cases: [Case] = [
        Case(name: "OpenBLAS path, raw", fused: false, representation: .raw, base: false),
        Case(name: "fused kernels, raw", fused: true, representation: .raw, base: false),
        Case(name: "kept U", fused: false, representation: .perSample, base: false),
        Case(name: "diagonal base, raw", fused: false, representation: .raw, base: true),
        Case(name: "diagonal base, kept U", fused: false, representation: .perSample, base: true),
    ]

    let m = 6, inFeatures = 9, outFeatures = 5

    /// A linear layer with a snapshot taken the way `c` says (`withFused` around it sets the path).
    func layer(_ c: Case, seed: UInt64) throws -> (Preconditioner, Int, a: [Float], g: [Float], e: [Float]?) {
        var rng = SeededRandom(seed)
        let a = rng.array(m * inFeatures), g = rng.array(m * outFeatures)
        let p = Preconditioner()
        let id = try p.addLinear(inFeatures: inFeatures, outFeatures: outFeatures, bias: true)
        try p.setSnapshotRepresentation(layer: id, c.representation)
        var e: [Float]?
        if c.base {
            let values = (0..<(outFeatures * (inFeatures + 1))).map { _ in 0.5 + abs(rng.next()) }
            try p.setBase(layer: id, weightBase: Array(values[0..<(outFeatures * inFeatures)]),
                          biasBase: Array(values[(outFeatures * inFeatures)...]))
            e = values
        }
        try p.updateCurvature(layer: id, batch: m, activations: a, outputGrads: g, gradScale: 0.5)
        return (p, id, a, g, e)
    }

    @Test(arguments: cases.indices)
    func scaleOneGivesTheOneCallBitsAndScalesMatchTheOracle(_ index: Int) throws {
        let c = Self.cases[index]
        try withFused(c.fused) {
            let (p, id, a, g, e) = try layer(c, seed: UInt64(40 + index))
            var rng = SeededRandom(UInt64(90 + index))
            let vw = rng.array(outFeatures * inFeatures), vb = rng.array(outFeatures)
            let once = try p.precondition(layer: id, weightGrad: vw, biasGrad: vb)
            let dotOnce = try p.stats(layer: id).updateDotGrad

            try p.preconditionPrepare(layer: id, weightGrad: vw, biasGrad: vb)
            #expect(try p.stats(layer: id).updateDotGrad == dotOnce)  // what klClipFactor sums
            let two = try p.preconditionFinish(layer: id, weightGrad: vw, biasGrad: vb, scale: 1)
            #expect(two.weight == once.weight)
            #expect(two.bias == once.bias)

            // A scale, written in place over the gradient.
            let nu = 0.37
            try p.preconditionPrepare(layer: id, weightGrad: vw, biasGrad: vb)
            var iw = vw, ib = vb
            try iw.withUnsafeMutableBufferPointer { wp in
                try ib.withUnsafeMutableBufferPointer { bp in
                    try p.preconditionFinish(layer: id, weightGrad: UnsafeBufferPointer(wp), biasGrad: UnsafeBufferPointer(bp),
                                             scale: nu, weightUpdate: wp, biasUpdate: bp)
                }
            }
            #expect(try p.stats(layer: id).updateDotGrad == dotOnce)  // the unscaled update's, as precondition's
            let oracle = DenseOracle(activations: a, outputGrads: g, batch: m, inFeatures: inFeatures,
                                     outFeatures: outFeatures, bias: true, scale: 0.5)
            // The base in the rows' order [W row | b] per output.
            var base: [Double]?
            if let e {
                var rows: [Double] = []
                for r in 0..<outFeatures {
                    for col in 0..<inFeatures { rows.append(Double(e[r * inFeatures + col])) }
                    rows.append(Double(e[outFeatures * inFeatures + r]))
                }
                base = rows
            }
            let want = oracle.solve(damping: Preconditioner.defaultDamping, base: base,
                                    joined(vw, vb, out: outFeatures, in: inFeatures)).map { nu * $0 }
            #expect(relativeError(joined(iw, ib, out: outFeatures, in: inFeatures), want) <= tolerance)
        }
    }

    @Test func layersPreparedInTurnKeepTheirOwnCoefficients() throws {
        // Two layers of different sizes on one handle (one workspace): both prepared, then both
        // finished, in the reverse order, each with the one-call bits.
        let p = Preconditioner()
        var rng = SeededRandom(7)
        let shapes = [(m: 6, inF: 9, outF: 5), (m: 11, inF: 30, outF: 20)]
        var ids: [Int] = [], grads: [([Float], [Float])] = [], once: [([Float], [Float]?)] = []
        for s in shapes {
            let id = try p.addLinear(inFeatures: s.inF, outFeatures: s.outF, bias: true)
            try p.updateCurvature(layer: id, batch: s.m, activations: rng.array(s.m * s.inF),
                                  outputGrads: rng.array(s.m * s.outF), gradScale: Float(s.m))
            let v = (rng.array(s.inF * s.outF), rng.array(s.outF))
            once.append(try p.precondition(layer: id, weightGrad: v.0, biasGrad: v.1))
            ids.append(id)
            grads.append(v)
        }
        for (id, v) in zip(ids, grads) { try p.preconditionPrepare(layer: id, weightGrad: v.0, biasGrad: v.1) }
        for k in ids.indices.reversed() {
            let got = try p.preconditionFinish(layer: ids[k], weightGrad: grads[k].0, biasGrad: grads[k].1)
            #expect(got.weight == once[k].0)
            #expect(got.bias == once[k].1)
        }
    }

    @Test func convolutionsOnBothRepresentations() throws {
        let shape = Conv2dShape(inChannels: 2, outChannels: 3, inHeight: 6, inWidth: 5, kernelHeight: 3, kernelWidth: 3,
                                paddingHeight: 1, paddingWidth: 1)
        for representation in [SnapshotRepresentation.raw, .perSample] {
            var rng = SeededRandom(11)
            let p = Preconditioner()
            let id = try p.addConv2d(shape)
            try p.setSnapshotRepresentation(layer: id, representation)
            let m = 3
            try p.updateCurvature(layer: id, batch: m, activations: rng.array(m * 2 * 6 * 5), outputGrads: rng.array(m * 3 * 6 * 5),
                                  gradScale: 1)
            let vw = rng.array(3 * 2 * 9), vb = rng.array(3)
            let once = try p.precondition(layer: id, weightGrad: vw, biasGrad: vb)
            try p.preconditionPrepare(layer: id, weightGrad: vw, biasGrad: vb)
            let two = try p.preconditionFinish(layer: id, weightGrad: vw, biasGrad: vb)
            #expect(two.weight == once.weight)
            #expect(two.bias == once.bias)
        }
    }

    @Test func refusalsKeepThePreparedPhaseAndTheOutputs() throws {
        let (p, id, _, _, _) = try withFused(false) { try layer(Self.cases[0], seed: 3) }
        var rng = SeededRandom(5)
        let vw = rng.array(outFeatures * inFeatures), vb = rng.array(outFeatures)
        let once = try p.precondition(layer: id, weightGrad: vw, biasGrad: vb)
        // No first phase yet.
        refused(.state) { () throws(TENGraDError) in _ = try p.preconditionFinish(layer: id, weightGrad: vw, biasGrad: vb) }

        try p.preconditionPrepare(layer: id, weightGrad: vw, biasGrad: vb)
        // A failed second prepare (NaN) keeps the first.
        var bad = vw
        bad[3] = .nan
        refused(.notFinite) { () throws(TENGraDError) in try p.preconditionPrepare(layer: id, weightGrad: bad, biasGrad: vb) }
        // A scale that is not finite, or that overflows float32; the outputs stay as they were.
        var outW = [Float](repeating: 7, count: vw.count), outB = [Float](repeating: 7, count: vb.count)
        for scale in [Double.nan, .infinity, 1e39] {
            refused(scale.isFinite ? .numerical : .invalidArgument) { () throws(TENGraDError) in
                try outW.withUnsafeMutableBufferPointer { (wp) throws(TENGraDError) in
                    try outB.withUnsafeMutableBufferPointer { (bp) throws(TENGraDError) in
                        try vw.withUnsafeBufferPointer { (w) throws(TENGraDError) in
                            try vb.withUnsafeBufferPointer { (b) throws(TENGraDError) in
                                try p.preconditionFinish(layer: id, weightGrad: w, biasGrad: b, scale: scale, weightUpdate: wp,
                                                         biasUpdate: bp)
                            }
                        }
                    }
                }
            }
        }
        #expect(outW.allSatisfy { $0 == 7 } && outB.allSatisfy { $0 == 7 })
        // The first phase is still there, and is spent by its finish.
        let two = try p.preconditionFinish(layer: id, weightGrad: vw, biasGrad: vb)
        #expect(two.weight == once.weight)
        refused(.state) { () throws(TENGraDError) in _ = try p.preconditionFinish(layer: id, weightGrad: vw, biasGrad: vb) }

        // A curvature update drops an unfinished first phase.
        try p.preconditionPrepare(layer: id, weightGrad: vw, biasGrad: vb)
        try p.updateCurvature(layer: id, batch: m, activations: rng.array(m * inFeatures), outputGrads: rng.array(m * outFeatures),
                              gradScale: 1)
        refused(.state) { () throws(TENGraDError) in _ = try p.preconditionFinish(layer: id, weightGrad: vw, biasGrad: vb) }
    }
}
