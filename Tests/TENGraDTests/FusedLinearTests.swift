import Testing
@testable import TENGraD

/// The linear precondition's own kernels (Sources/CKernels, `FusedLinear`), reached with small
/// layers by lowering their size threshold: against the dense float64 oracle, against the
/// OpenBLAS path, in place against out of place, one thread against two, and refusals that leave
/// the outputs as they were. On CPUs without AVX2 the kernels never run and these tests check the
/// OpenBLAS path instead.
/// Runs `body` with the fused path taken by linear layers of any size (or by none); also
/// TwoPhaseTests'.
func withFused<T>(_ on: Bool, _ body: () throws -> T) rethrows -> T {
    let saved = FusedLinear.minWeights
    FusedLinear.minWeights = on ? 0 : Int.max
    defer { FusedLinear.minWeights = saved }
    return try body()
}

@Suite(.serialized) struct FusedLinearTests {

    // Row tiles of 48 and register tiles of 6 rows × 16 columns, 256-feature blocks: sizes on and
    // off every boundary, batch 1, positions past one panel of 16 and up to `maxPositions`. The
    // dense oracle solves in d = out·(in + 1) dimensions, so it checks the small ones; every shape
    // is checked against the OpenBLAS path (itself oracle-tested).
    static let shapes: [(m: Int, inFeatures: Int, outFeatures: Int, oracle: Bool)] = [
        (1, 1, 1, true), (5, 17, 7, true), (20, 9, 13, true), (33, 3, 50, true), (17, 300, 1, true),
        (32, 20, 50, false), (17, 300, 7, false), (40, 9, 49, false), (3, 16, 96, false), (33, 257, 6, false),
        (64, 31, 97, false),
    ]

    func precondition(
        _ p: Preconditioner, _ layer: Int, _ vw: [Float], _ vb: [Float]?
    ) throws -> (w: [Float], b: [Float]?, inPlace: ([Float], [Float])) {
        let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        var iw = vw, ib = vb ?? []
        try iw.withUnsafeMutableBufferPointer { wp in
            try ib.withUnsafeMutableBufferPointer { bp in
                try p.precondition(
                    layer: layer, weightGrad: UnsafeBufferPointer(wp), biasGrad: vb == nil ? nil : UnsafeBufferPointer(bp),
                    weightUpdate: wp, biasUpdate: vb == nil ? nil : bp)
            }
        }
        return (w, b, (iw, ib))
    }

    @Test(arguments: shapes.indices, [true, false])
    func matchesOracleAndOpenBLASPath(_ index: Int, bias: Bool) throws {
        let s = Self.shapes[index]
        var rng = SeededRandom(UInt64(1000 + index * 7 + (bias ? 1 : 0)))
        let a = rng.array(s.m * s.inFeatures), g = rng.array(s.m * s.outFeatures)
        let vw = rng.array(s.inFeatures * s.outFeatures), vb: [Float]? = bias ? rng.array(s.outFeatures) : nil
        func run(fused: Bool, threads: Int) throws -> (w: [Float], b: [Float]?, inPlace: ([Float], [Float])) {
            try withFused(fused) {
                // The curvature on one thread either way (OpenBLAS's Gram on two sums in another
                // order), the precondition on `threads`.
                let p = Preconditioner()
                try p.setBLASThreads(1)
                let layer = try p.addLinear(inFeatures: s.inFeatures, outFeatures: s.outFeatures, bias: bias)
                try p.updateCurvature(layer: layer, batch: s.m, activations: a, outputGrads: g, gradScale: 0.5)
                try p.setBLASThreads(threads)
                return try precondition(p, layer, vw, vb)
            }
        }
        #expect(s.m <= FusedLinear.maxPositions)
        let fused = try run(fused: true, threads: 1), twoThreads = try run(fused: true, threads: 2)
        let portable = try run(fused: false, threads: 1)
        let got = joined(fused.w, fused.b, out: s.outFeatures, in: s.inFeatures)
        if s.oracle {
            let oracle = DenseOracle(activations: a, outputGrads: g, batch: s.m, inFeatures: s.inFeatures,
                                     outFeatures: s.outFeatures, bias: bias, scale: 0.5)
            let want = oracle.solve(damping: Preconditioner.defaultDamping, joined(vw, vb, out: s.outFeatures, in: s.inFeatures))
            #expect(relativeError(got, want) <= tolerance)
        }
        // Both paths round differently (FMA in the epilogue) but agree to float32 precision.
        #expect(relativeError(got, joined(portable.w, portable.b, out: s.outFeatures, in: s.inFeatures)) <= 1e-5)
        // Bit for bit (compared as Bools: the arrays are long).
        #expect(fused.inPlace.0.elementsEqual(fused.w))
        if let b = fused.b { #expect(fused.inPlace.1.elementsEqual(b)) }
        #expect(twoThreads.w.elementsEqual(fused.w))
        #expect((twoThreads.b ?? []).elementsEqual(fused.b ?? []))
    }

    @Test func sequencesOverTokens() throws {
        let (m, tokens, inF, outF) = (3, 5, 19, 11)
        var rng = SeededRandom(77)
        let a = rng.array(m * tokens * inF), g = rng.array(m * tokens * outF)
        let vw = rng.array(inF * outF), vb = rng.array(outF)
        func run(_ on: Bool, _ mode: TokenMode) throws -> ([Float], [Float]?) {
            try withFused(on) {
                let p = Preconditioner()
                let layer = try p.addLinear(inFeatures: inF, outFeatures: outF, bias: true)
                try p.setTokenMode(layer: layer, mode)
                try p.updateCurvature(layer: layer, batch: m, tokens: tokens, activations: a, outputGrads: g, mask: nil, gradScale: 1)
                return try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
            }
        }
        for mode in [TokenMode.perSequence, .perToken] {
            let (fw, fb) = try run(true, mode), (pw, pb) = try run(false, mode)
            #expect(relativeError(joined(fw, fb, out: outF, in: inF), joined(pw, pb, out: outF, in: inF)) <= 1e-5)
        }
    }

    @Test func refusedGradientsLeaveTheOutputsAsTheyWere() throws {
        try withFused(true) {
            let (m, inF, outF) = (6, 23, 53)
            var rng = SeededRandom(3)
            let p = Preconditioner()
            let layer = try p.addLinear(inFeatures: inF, outFeatures: outF, bias: true)
            try p.updateCurvature(layer: layer, batch: m, activations: rng.array(m * inF), outputGrads: rng.array(m * outF), gradScale: 1)
            let vb = rng.array(outF)
            for (index, bad) in [(0, Float.nan), (inF * outF - 1, Float.infinity), (inF * 30 + 7, -Float.infinity)] {
                var vw = rng.array(inF * outF)
                vw[index] = bad
                refused(.notFinite) { () throws(TENGraDError) in _ = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb) }
                // In place: the gradient is the output and must come back unchanged.
                var iw = vw, ib = vb
                refused(.notFinite) { () throws(TENGraDError) in
                    try iw.withUnsafeMutableBufferPointer { (wp) throws(TENGraDError) in
                        try ib.withUnsafeMutableBufferPointer { (bp) throws(TENGraDError) in
                            try p.precondition(layer: layer, weightGrad: UnsafeBufferPointer(wp), biasGrad: UnsafeBufferPointer(bp),
                                               weightUpdate: wp, biasUpdate: bp)
                        }
                    }
                }
                #expect(iw.elementsEqual(vw) { $0 == $1 || ($0.isNaN && $1.isNaN) })
                #expect(ib == vb)
            }
            // Finite but so large the update would overflow: refused before anything is written.
            var iw = rng.array(inF * outF), ib = vb
            iw[5] = 3e38
            let before = iw
            refused(.numerical) { () throws(TENGraDError) in
                try iw.withUnsafeMutableBufferPointer { (wp) throws(TENGraDError) in
                    try ib.withUnsafeMutableBufferPointer { (bp) throws(TENGraDError) in
                        try p.precondition(layer: layer, weightGrad: UnsafeBufferPointer(wp), biasGrad: UnsafeBufferPointer(bp),
                                           weightUpdate: wp, biasUpdate: bp)
                    }
                }
            }
            #expect(iw == before)
            #expect(ib == vb)
        }
    }
}
