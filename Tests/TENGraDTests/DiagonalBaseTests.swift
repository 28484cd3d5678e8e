import Testing
@testable import TENGraD

/// The diagonal base (docs/DESIGN.md §13): a layer's block F + λE, E = diag(e), against the dense
/// oracle's (F + λ diag(e))⁻¹ for every kind, Gram strategy setting and representation; a new
/// damping, rows from another process, saved state; bad bases refused and nothing changed.
@Suite struct DiagonalBaseTests {
    /// One layer case: registers the layer, makes a batch, the oracle, and maps a (weight, bias)
    /// pair to the oracle's row order.
    struct Case {
        let add: (Preconditioner) throws -> Int
        let m: Int, tokens: Int
        let a: [Float], g: [Float], mask: [UInt8]?
        let scale: Float
        let oracle: DenseOracle
        let order: ([Float], [Float]?) -> [Double]
    }

    static func base(_ rng: inout SeededRandom, _ n: Int) -> [Float] {
        (0..<n).map { _ in Float(pow10(1.5 * Double(rng.next()))) }
    }

    static func cases() -> [(String, Case)] {
        var rng = SeededRandom(41)
        var out: [(String, Case)] = []
        do {  // linear with a bias
            let (m, n, o) = (6, 5, 3)
            let a = rng.array(m * n), g = rng.array(m * o)
            out.append(("linear", Case(
                add: { p in try p.addLinear(inFeatures: n, outFeatures: o, bias: true) },
                m: m, tokens: 1, a: a, g: g, mask: nil, scale: 2,
                oracle: DenseOracle(activations: a, outputGrads: g, batch: m, inFeatures: n, outFeatures: o, bias: true, scale: 2),
                order: { w, b in joined(w, b, out: o, in: n) })))
        }
        do {  // grouped, strided convolution
            let s = Conv2dShape(inChannels: 4, outChannels: 6, inHeight: 6, inWidth: 5, kernelHeight: 3, kernelWidth: 3,
                                strideHeight: 2, strideWidth: 1, paddingHeight: 1, paddingWidth: 1, groups: 2)
            let m = 4, ho = 3, wo = 5
            let a = rng.array(m * 4 * 6 * 5), g = rng.array(m * 6 * ho * wo)
            out.append(("conv", Case(
                add: { p in try p.addConv2d(s) }, m: m, tokens: 1, a: a, g: g, mask: nil, scale: 1,
                oracle: DenseOracle(conv: s, activations: a, outputGrads: g, batch: m, scale: 1),
                order: { w, b in joined(w, b, out: 6, in: 2 * 9) })))
        }
        do {  // LayerNorm's γ, β over tokens with padding
            let (m, T, D) = (4, 3, 5)
            let x = rng.array(m * T * D), g = rng.array(m * T * D)
            let mask: [UInt8] = (0..<(m * T)).map { $0 % T <= ($0 / T) % T ? 1 : 0 }
            out.append(("affine", Case(
                add: { p in try p.addAffine(features: D, bias: true) }, m: m, tokens: T, a: x, g: g,
                mask: mask, scale: 3, oracle: AffineLayerTests.oracle(x, g, m: m, T: T, D: D, bias: true, mask: mask, scale: 3),
                order: { w, b in (w + (b ?? [])).map(Double.init) })))
        }
        do {  // embedding: some ids in more than 8 samples (the syrk branch), some in few
            let (m, T, V, D) = (10, 3, 6, 4)
            var ids = EmbeddingLayerTests.ids(&rng, m * T, V)
            for i in 0..<m { ids[i * T] = 2 }
            let g = rng.array(m * T * D)
            out.append(("embedding", Case(
                add: { p in try p.addEmbedding(vocabulary: V, features: D) }, m: m, tokens: T, a: ids,
                g: g, mask: nil, scale: 1, oracle: EmbeddingLayerTests.oracle(ids, g, m: m, T: T, V: V, D: D, mask: nil, scale: 1),
                order: { w, _ in w.map(Double.init) })))
        }
        return out
    }

    @Test(arguments: [ConvStrategy.auto, .factored, .explicit], [SnapshotRepresentation.raw, .perSample])
    func matchesOracle(strategy: ConvStrategy, representation: SnapshotRepresentation) throws {
        for (name, c) in Self.cases() {
            var rng = SeededRandom(7)
            let p = Preconditioner()
            try p.setDamping(0.05)
            let layer = try c.add(p)
            try p.setConvStrategy(layer: layer, strategy)
            try p.setSnapshotRepresentation(layer: layer, representation)
            let counts = try p.arrayCounts(layer: layer, batch: 0)
            let ew = Self.base(&rng, counts.weight), eb: [Float]? = counts.bias > 0 ? Self.base(&rng, counts.bias) : nil
            try p.setBase(layer: layer, weightBase: ew, biasBase: eb)
            #expect(try p.hasBase(layer: layer))
            let e = c.order(ew, eb)
            try p.updateCurvature(layer: layer, batch: c.m, tokens: c.tokens, activations: c.a, outputGrads: c.g, mask: c.mask,
                                  gradScale: c.scale)
            let s = try p.stats(layer: layer)
            #expect(s.representation == representation, "\(name)")
            let vw = rng.array(counts.weight), vb: [Float]? = counts.bias > 0 ? rng.array(counts.bias) : nil
            let v = c.order(vw, vb)
            let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
            let want = c.oracle.solve(damping: 0.05, base: e, v)
            #expect(relativeError(c.order(w, b), want) <= tolerance, "\(name)")
            // ⟨update, v⟩ for KL clipping.
            let dot = zip(v, want).reduce(0) { $0 + $1.0 * $1.1 }
            #expect(abs(try p.stats(layer: layer).updateDotGrad - dot) <= 1e-4 * abs(dot), "\(name)")
            // A new λ re-factorizes the kept Gram.
            try p.setDamping(0.4)
            let (w2, b2) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
            #expect(relativeError(c.order(w2, b2), c.oracle.solve(damping: 0.4, base: e, v)) <= tolerance, "\(name)")
            // The one-call update: (F + λE)⁻¹ of the batch's mean gradient.
            let (w3, b3) = try p.naturalGradient(layer: layer, batch: c.m, tokens: c.tokens, activations: c.a, outputGrads: c.g,
                                                 mask: c.mask, gradScale: c.scale)
            #expect(relativeError(c.order(w3, b3), c.oracle.solve(damping: 0.4, base: e, c.oracle.meanGradient)) <= tolerance,
                    "\(name)")
            // Saved and restored (into a fresh handle): the same bits.
            let q = Preconditioner()
            try q.loadState(p.saveState())
            #expect(try q.hasBase(layer: layer))
            #expect(try q.precondition(layer: layer, weightGrad: vw, biasGrad: vb) == p.precondition(layer: layer, weightGrad: vw, biasGrad: vb))
            // Rows from another process, with the same base: the same block.
            let rows = try p.perSampleGradients(layer: layer, batch: c.m, tokens: c.tokens, activations: c.a, outputGrads: c.g,
                                                mask: c.mask, gradScale: c.scale)
            try q.updateCurvature(layer: layer, batch: c.m, perSampleGradients: rows)
            let (w4, b4) = try q.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
            #expect(relativeError(c.order(w4, b4), c.oracle.solve(damping: 0.4, base: e, v)) <= tolerance, "\(name)")
        }
    }

    /// A curvature update of the case's batch; false when it does not fit the memory limit.
    static func refresh(_ p: Preconditioner, _ layer: Int, _ c: Case) throws(TENGraDError) -> Bool {
        do {
            try p.updateCurvature(layer: layer, batch: c.m, tokens: c.tokens, activations: c.a, outputGrads: c.g, mask: c.mask,
                                  gradScale: c.scale)
            return true
        } catch {
            if error.code == .outOfMemory { return false }
            throw error
        }
    }

    @Test func blockwiseExplicitGramUnderAMemoryLimit() throws {
        // A limit that forces the explicit Gram to form U a few output features at a time.
        for (name, c) in Self.cases() where name != "affine" {
            var rng = SeededRandom(8)
            let p = Preconditioner()
            let layer = try c.add(p)
            try p.setConvStrategy(layer: layer, .explicit)
            try p.setSnapshotRepresentation(layer: layer, .raw)
            let counts = try p.arrayCounts(layer: layer, batch: 0)
            let ew = Self.base(&rng, counts.weight), eb: [Float]? = counts.bias > 0 ? Self.base(&rng, counts.bias) : nil
            try p.setBase(layer: layer, weightBase: ew, biasBase: eb)
            // The smallest limit (in steps of 256 bytes) under which the refresh succeeds: each
            // refused attempt changes nothing.
            var limit = p.memoryInUse
            try p.setMemoryLimit(limit)
            while try !Self.refresh(p, layer, c) {
                limit += 256
                try p.setMemoryLimit(limit)
            }
            let uBytes = try p.arrayCounts(layer: layer, batch: c.m).perSampleGradients * 4
            #expect(try p.stats(layer: layer).workspaceBytes < uBytes, "\(name): U formed whole")
            try p.setMemoryLimit(0)
            let vw = rng.array(counts.weight), vb: [Float]? = counts.bias > 0 ? rng.array(counts.bias) : nil
            let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
            let want = c.oracle.solve(damping: Preconditioner.defaultDamping, base: c.order(ew, eb), c.order(vw, vb))
            #expect(relativeError(c.order(w, b), want) <= tolerance, "\(name)")
        }
    }

    @Test func badBasesAreRefusedAndChangeNothing() throws {
        let c = Self.cases()[0].1
        let p = Preconditioner()
        let layer = try c.add(p)
        var rng = SeededRandom(9)
        let ew = Self.base(&rng, 15), eb = Self.base(&rng, 3)
        try p.setBase(layer: layer, weightBase: ew, biasBase: eb)
        try p.updateCurvature(layer: layer, batch: c.m, activations: c.a, outputGrads: c.g, gradScale: c.scale)
        let state = p.saveState()
        for (value, code) in [(Float(0), TENGraDError.Code.invalidArgument), (-1, .invalidArgument), (Float.leastNormalMagnitude / 4, .invalidArgument),
                              (.nan, .notFinite), (.infinity, .notFinite)] {
            var bad = ew
            bad[4] = value
            let badWeight = bad
            refused(code) { () throws(TENGraDError) in try p.setBase(layer: layer, weightBase: badWeight, biasBase: eb) }
            var bias = eb
            bias[2] = value
            let badBias = bias
            refused(code) { () throws(TENGraDError) in try p.setBase(layer: layer, weightBase: ew, biasBase: badBias) }
        }
        refused(.invalidArgument) { () throws(TENGraDError) in try p.setBase(layer: layer, weightBase: ew, biasBase: nil) }
        refused(.invalidArgument) { () throws(TENGraDError) in try p.setBase(layer: layer, weightBase: nil, biasBase: eb) }
        refused(.shape) { () throws(TENGraDError) in try p.setBase(layer: layer, weightBase: Array(ew.dropLast()), biasBase: eb) }
        refused(.invalidArgument) { () throws(TENGraDError) in try p.setBase(layer: 5, weightBase: ew, biasBase: eb) }
        #expect(p.saveState() == state)
        // A base's memory counts against the limit: refused when it does not fit, nothing changed.
        let q = Preconditioner()
        let big = try q.addLinear(inFeatures: 300, outFeatures: 300, bias: false)
        try q.setMemoryLimit(300 * 300 * 4)
        refused(.outOfMemory) { () throws(TENGraDError) in
            try q.setBase(layer: big, weightBase: [Float](repeating: 1, count: 300 * 300), biasBase: nil)
        }
        #expect(try !q.hasBase(layer: big) && q.memoryInUse == 0)
    }
}

private func pow10(_ x: Double) -> Double {
    var r = 1.0, k = x < 0 ? -x : x
    // 10^x = e^{x ln 10} by a short series on the fraction (the test needs spread, not accuracy).
    while k >= 1 { r *= 10; k -= 1 }
    var term = 1.0, sum = 1.0
    for i in 1..<20 { term *= k * 2.302585092994046 / Double(i); sum += term }
    r *= sum
    return x < 0 ? 1 / r : r
}
