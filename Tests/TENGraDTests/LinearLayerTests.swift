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

    /// A memory limit that leaves room for a few samples per block: the factored Gram goes block
    /// pair by block pair (diagonal blocks by syrk, the others by GEMM, each written on one side
    /// of K and mirrored to the other), the last block short — still the oracle's answer, K
    /// symmetric and the same Gram as one block would give to float32 rounding.
    @Test(arguments: [true, false])
    func factoredGramInSampleBlocksUnderAMemoryLimit(bias: Bool) throws {
        let m = 24, inF = 12, outF = 10
        var rng = SeededRandom(17)
        let a = rng.array(m * inF), g = rng.array(m * outF)
        let oracle = DenseOracle(activations: a, outputGrads: g, batch: m, inFeatures: inF, outFeatures: outF, bias: bias, scale: 1)
        let want = oracle.solve(damping: 0.1, oracle.meanGradient)
        func run(limit: Int?) throws -> (update: [Double], gram: [Double], workspace: Int) {
            let p = Preconditioner()
            let layer = try p.addLinear(inFeatures: inF, outFeatures: outF, bias: bias)
            try p.setConvStrategy(layer: layer, .factored)
            try p.setSnapshotRepresentation(layer: layer, .raw)
            if let limit { try p.setMemoryLimit(limit) }
            let (w, b) = try p.naturalGradient(layer: layer, batch: m, activations: a, outputGrads: g, gradScale: 1)
            let gram = try p.layer(layer).snapshot!.system.gram
            return (joined(w, b, out: outF, in: inF), Array(UnsafeBufferPointer(start: gram.base, count: m * m)),
                    try p.stats(layer: layer).workspaceBytes)
        }
        let whole = try run(limit: nil)
        // The smallest limit that runs: blocks of a few samples (a 12-sample block alone needs
        // 4 · (2 · 12 · (in + out) + 2 · 12²) = 3264 bytes of workspace).
        var blocked: (update: [Double], gram: [Double], workspace: Int)?
        for limit in stride(from: 5_000, through: 100_000, by: 500) {
            if let r = try? run(limit: limit) {
                blocked = r
                break
            }
        }
        let r = try #require(blocked)
        #expect(r.workspace < 3264)
        for got in [whole, r] {
            #expect(relativeError(got.update, want) <= tolerance)
            let asymmetric = (0..<m).flatMap { i in (0..<i).filter { j in got.gram[i * m + j] != got.gram[j * m + i] } }
            #expect(asymmetric.isEmpty)
        }
        let scale = whole.gram.map(abs).max()!
        #expect(zip(r.gram, whole.gram).allSatisfy { abs($0 - $1) <= 1e-5 * scale })
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

/// The public sequence API (docs/DESIGN.md §12): T per call, masks, token modes, bad input.
@Suite struct SequenceCallTests {
    /// Oracle rows u_i = s Σ_t mask_it g_it ã_itᵀ (bias: Σ_t mask_it g_it), per sequence.
    static func sequenceOracle(_ a: [Float], _ g: [Float], m: Int, T: Int, inF: Int, outF: Int, bias: Bool,
                               mask: [UInt8]?, scale: Double) -> DenseOracle {
        let width = inF + (bias ? 1 : 0)
        var rows: [[Double]] = []
        for i in 0..<m {
            var row = [Double](repeating: 0, count: outF * width)
            for t in 0..<T where (mask?[i * T + t] ?? 1) == 1 {
                for o in 0..<outF {
                    let go = scale * Double(g[(i * T + t) * outF + o])
                    for c in 0..<width { row[o * width + c] += go * (c < inF ? Double(a[(i * T + t) * inF + c]) : 1) }
                }
            }
            rows.append(row)
        }
        return DenseOracle(rows: rows)
    }

    @Test(arguments: [ConvStrategy.factored, .explicit], [SnapshotRepresentation.raw, .perSample])
    func tokensVaryMasksAndBothEntryPoints(strategy: ConvStrategy, representation: SnapshotRepresentation) throws {
        let inF = 3, outF = 4
        for bias in [true, false] {
            let p = Preconditioner()
            try p.setDamping(0.2)
            let layer = try p.addLinear(inFeatures: inF, outFeatures: outF, bias: bias)
            try p.setConvStrategy(layer: layer, strategy)
            try p.setSnapshotRepresentation(layer: layer, representation)
            var rng = SeededRandom(bias ? 5 : 6)
            // T changes between calls; the second call has padding.
            for (m, T, padded) in [(4, 3, false), (4, 6, true), (5, 1, false), (5, 2, false), (3, 2, false)] {  // same m, other T: no stale storage
                let a = rng.array(m * T * inF), g = rng.array(m * T * outF)
                let mask: [UInt8]? = padded ? (0..<(m * T)).map { ($0 % T) < T - 1 - ($0 / T) ? 1 : 0 } : nil
                let oracle = Self.sequenceOracle(a, g, m: m, T: T, inF: inF, outF: outF, bias: bias, mask: mask, scale: 2)
                let (w, b) = try p.naturalGradient(layer: layer, batch: m, tokens: T, activations: a, outputGrads: g, mask: mask, gradScale: 2)
                #expect(relativeError(joined(w, b, out: outF, in: inF), oracle.solve(damping: 0.2, oracle.meanGradient)) <= tolerance)
                #expect(try p.stats(layer: layer).representation == representation)
                let vw = rng.array(outF * inF), vb: [Float]? = bias ? rng.array(outF) : nil
                try p.updateCurvature(layer: layer, batch: m, tokens: T, activations: a, outputGrads: g, mask: mask, gradScale: 2)
                let (w2, b2) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
                #expect(relativeError(joined(w2, b2, out: outF, in: inF), oracle.solve(damping: 0.2, joined(vw, vb, out: outF, in: inF))) <= tolerance)
                // A saved and restored handle keeps T (raw snapshots need it for the reuse path).
                let q = Preconditioner()
                try q.loadState(p.saveState())
                #expect(try q.precondition(layer: layer, weightGrad: vw, biasGrad: vb) == (w2, b2))
            }
        }
    }

    /// T = 1 equals the plain call bitwise; a mask of ones equals no mask bitwise; padding with
    /// garbage (NaN included) behind a zero mask equals the batch without those tokens.
    @Test func equivalences() throws {
        let m = 4, inF = 5, outF = 3
        var rng = SeededRandom(21)
        let a = rng.array(m * inF), g = rng.array(m * outF)
        let p = Preconditioner(), q = Preconditioner()
        let l = try p.addLinear(inFeatures: inF, outFeatures: outF, bias: true)
        _ = try q.addLinear(inFeatures: inF, outFeatures: outF, bias: true)
        let plain = try p.naturalGradient(layer: l, batch: m, activations: a, outputGrads: g, gradScale: 4)
        let seq = try q.naturalGradient(layer: l, batch: m, tokens: 1, activations: a, outputGrads: g, mask: nil, gradScale: 4)
        #expect(plain == seq)
        let T = 3
        let at = rng.array(m * T * inF), gt = rng.array(m * T * outF)
        let none = try p.naturalGradient(layer: l, batch: m, tokens: T, activations: at, outputGrads: gt, mask: nil, gradScale: 1)
        let ones = try p.naturalGradient(layer: l, batch: m, tokens: T, activations: at, outputGrads: gt,
                                         mask: [UInt8](repeating: 1, count: m * T), gradScale: 1)
        #expect(none == ones)
        // Tokens 0..<2 of every sequence, then a padded third token full of NaN.
        var ap: [Float] = [], gp: [Float] = [], a2: [Float] = [], g2: [Float] = []
        for i in 0..<m {
            for t in 0..<T {
                let ar = Array(at[((i * T + t) * inF)..<((i * T + t + 1) * inF)]), gr = Array(gt[((i * T + t) * outF)..<((i * T + t + 1) * outF)])
                if t < 2 { a2 += ar; g2 += gr; ap += ar; gp += gr } else {
                    ap += [Float](repeating: .nan, count: inF); gp += [Float](repeating: .nan, count: outF)
                }
            }
        }
        let mask = (0..<(m * T)).map { UInt8($0 % T < 2 ? 1 : 0) }
        let short = try p.naturalGradient(layer: l, batch: m, tokens: 2, activations: a2, outputGrads: g2, mask: nil, gradScale: 1)
        let masked = try p.naturalGradient(layer: l, batch: m, tokens: T, activations: ap, outputGrads: gp, mask: mask, gradScale: 1)
        #expect(relativeError(joined(masked.weight, masked.bias, out: outF, in: inF), joined(short.weight, short.bias, out: outF, in: inF)) <= 1e-6)
    }

    /// Per-token mode equals the plain layer on the unmasked tokens flattened into the batch.
    @Test func perTokenModeIsFlattening() throws {
        let m = 3, T = 4, inF = 2, outF = 3
        var rng = SeededRandom(8)
        let a = rng.array(m * T * inF), g = rng.array(m * T * outF)
        let mask = (0..<(m * T)).map { UInt8($0 % 5 == 3 ? 0 : 1) }
        var fa: [Float] = [], fg: [Float] = []
        for r in 0..<(m * T) where mask[r] == 1 {
            fa += a[(r * inF)..<((r + 1) * inF)]
            fg += g[(r * outF)..<((r + 1) * outF)]
        }
        let kept = mask.filter { $0 == 1 }.count
        let p = Preconditioner(), q = Preconditioner()
        let l = try p.addLinear(inFeatures: inF, outFeatures: outF, bias: true)
        _ = try q.addLinear(inFeatures: inF, outFeatures: outF, bias: true)
        try p.setTokenMode(layer: l, .perToken)
        let got = try p.naturalGradient(layer: l, batch: m, tokens: T, activations: a, outputGrads: g, mask: mask, gradScale: 3)
        let want = try q.naturalGradient(layer: l, batch: kept, activations: fa, outputGrads: fg, gradScale: 3)
        #expect(got == want)
        #expect(try p.stats(layer: l).batch == kept)
        let unmasked = try p.naturalGradient(layer: l, batch: m, tokens: T, activations: a, outputGrads: g, mask: nil, gradScale: 3)
        let flat = try q.naturalGradient(layer: l, batch: m * T, activations: a, outputGrads: g, gradScale: 3)
        #expect(unmasked == flat)
    }

    /// T = 0, masks of the wrong size or with values other than 0/1, an all-padding mask in
    /// per-token mode, tokens on a conv layer, token modes on a conv layer: refused, nothing changes.
    @Test func badSequenceInputChangesNothing() throws {
        let p = Preconditioner()
        let l = try p.addLinear(inFeatures: 2, outFeatures: 2, bias: true)
        let c = try p.addConv2d(Conv2dShape(inChannels: 1, outChannels: 1, inHeight: 3, inWidth: 3, kernelHeight: 3, kernelWidth: 3))
        var rng = SeededRandom(3)
        let a = rng.array(2 * 3 * 2), g = rng.array(2 * 3 * 2)
        try p.updateCurvature(layer: l, batch: 2, tokens: 3, activations: a, outputGrads: g, mask: nil, gradScale: 1)
        let before = p.saveState()
        refused(.invalidArgument) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: 2, tokens: 0, activations: a, outputGrads: g, mask: nil, gradScale: 1) }
        refused(.shape) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: 2, tokens: 2, activations: a, outputGrads: g, mask: nil, gradScale: 1) }
        refused(.shape) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: 2, tokens: 3, activations: a, outputGrads: g, mask: [1, 1, 1], gradScale: 1) }
        refused(.invalidArgument) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: 2, tokens: 3, activations: a, outputGrads: g, mask: [1, 1, 2, 1, 1, 1], gradScale: 1) }
        try p.setTokenMode(layer: l, .perToken)
        refused(.invalidArgument) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: 2, tokens: 3, activations: a, outputGrads: g, mask: [0, 0, 0, 0, 0, 0], gradScale: 1) }
        try p.setTokenMode(layer: l, .perSequence)
        refused(.invalidArgument) { () throws(TENGraDError) in try p.setTokenMode(layer: c, .perToken) }
        refused(.invalidArgument) { () throws(TENGraDError) in try p.updateCurvature(layer: c, batch: 1, tokens: 2, activations: rng.array(18), outputGrads: rng.array(2), mask: nil, gradScale: 1) }
        var bad = a
        bad[0] = .nan
        refused(.notFinite) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: 2, tokens: 3, activations: bad, outputGrads: g, mask: nil, gradScale: 1) }
        #expect(p.saveState() == before)
    }
}
