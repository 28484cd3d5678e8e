import Testing
@testable import TENGraD

/// The embedding kind (nn.Embedding): y_t = W[id_t] over T tokens, against the oracle built from
/// the dense one-hot per-sample gradients u_i[v, :] = s Σ_{t: id_it = v, mask_it = 1} g_it.
@Suite struct EmbeddingLayerTests {
    static func oracle(_ ids: [Float], _ g: [Float], m: Int, T: Int, V: Int, D: Int, mask: [UInt8]?, scale: Double) -> DenseOracle {
        var rows: [[Double]] = []
        for i in 0..<m {
            var u = [Double](repeating: 0, count: V * D)
            for t in 0..<T where (mask?[i * T + t] ?? 1) == 1 {
                let v = Int(ids[i * T + t])
                for f in 0..<D { u[v * D + f] += scale * Double(g[(i * T + t) * D + f]) }
            }
            rows.append(u)
        }
        return DenseOracle(rows: rows)
    }

    /// Ids drawn from a small range so that samples share ids (and repeat them within a sample).
    static func ids(_ rng: inout SeededRandom, _ count: Int, _ V: Int) -> [Float] {
        rng.array(count).map { Float(min(V - 1, Int((abs($0) * 997).truncatingRemainder(dividingBy: Float(V))))) }
    }

    @Test(arguments: [ConvStrategy.auto, .factored, .explicit], [SnapshotRepresentation.auto, .raw, .perSample])
    func matchesOracle(strategy: ConvStrategy, representation: SnapshotRepresentation) throws {
        let V = 7, D = 4
        let p = Preconditioner()
        try p.setDamping(0.05)
        let layer = try p.addEmbedding(vocabulary: V, features: D)
        try p.setConvStrategy(layer: layer, strategy)
        try p.setSnapshotRepresentation(layer: layer, representation)
        var rng = SeededRandom(21)
        // Includes batches of more than 8 samples sharing an id (the syrk path of the sorted Gram).
        for (m, T, padded) in [(6, 1, false), (4, 3, true), (5, 6, false), (12, 4, false), (3, 9, true)] {
            let x = Self.ids(&rng, m * T, V), g = rng.array(m * T * D)
            let mask: [UInt8]? = padded ? (0..<(m * T)).map { ($0 % T) < T - ($0 / T) % T ? 1 : 0 } : nil
            let o = Self.oracle(x, g, m: m, T: T, V: V, D: D, mask: mask, scale: 3)
            let (w, b) = try p.naturalGradient(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: mask, gradScale: 3)
            #expect(b == nil)
            #expect(relativeError(w.map(Double.init), o.solve(damping: 0.05, o.meanGradient)) <= tolerance)
            let s = try p.stats(layer: layer)
            #expect(s.kind == .embedding && s.parameters == V * D && s.batch == m)
            #expect(s.representation == (representation == .auto ? .raw : representation))
            #expect(s.convStrategy == (strategy == .auto ? .factored : strategy))
            let v = rng.array(V * D)
            try p.updateCurvature(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: mask, gradScale: 3)
            let (w2, _) = try p.precondition(layer: layer, weightGrad: v, biasGrad: nil)
            #expect(relativeError(w2.map(Double.init), o.solve(damping: 0.05, v.map(Double.init))) <= tolerance)
            // In place (the update written over the gradient): the same numbers.
            var inPlace = v
            try inPlace.withUnsafeMutableBufferPointer { (buf) throws(TENGraDError) in
                try p.precondition(layer: layer, weightGrad: UnsafeBufferPointer(buf), biasGrad: nil, weightUpdate: buf, biasUpdate: nil)
            }
            #expect(inPlace == w2)
            let rows = try p.perSampleGradients(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: mask, gradScale: 3)
            #expect(relativeError(rows.map(Double.init), o.u.flatMap { $0 }) <= 1e-6)
            let q = Preconditioner()
            try q.loadState(p.saveState())
            #expect(try q.layerDescription(layer: layer) == .embedding(vocabulary: V, features: D))
            #expect(try q.precondition(layer: layer, weightGrad: v, biasGrad: nil).0 == w2)
        }
    }

    /// A memory limit too small for all of U: the explicit Gram forms it feature block by feature
    /// block (V × n per sample), still the oracle's answer.
    @Test func blockwiseUnderMemoryLimit() throws {
        let m = 8, T = 3, V = 30, D = 12
        var rng = SeededRandom(5)
        let x = Self.ids(&rng, m * T, V), g = rng.array(m * T * D)
        let o = Self.oracle(x, g, m: m, T: T, V: V, D: D, mask: nil, scale: 1)
        let p = Preconditioner()
        let layer = try p.addEmbedding(vocabulary: V, features: D)
        try p.setConvStrategy(layer: layer, .explicit)
        try p.setMemoryLimit(6_000)
        let (w, _) = try p.naturalGradient(layer: layer, batch: m, tokens: T, activations: x, outputGrads: g, mask: nil, gradScale: 1)
        #expect(relativeError(w.map(Double.init), o.solve(damping: 0.1, o.meanGradient)) <= tolerance)
        #expect(try p.stats(layer: layer).workspaceBytes < 4 * m * V * D)  // U was never whole
    }

    /// Per-token mode equals the flattened batch; bad ids and other bad input are refused and
    /// change nothing, restored state included.
    @Test func perTokenAndBadInput() throws {
        let m = 3, T = 4, V = 5, D = 3
        var rng = SeededRandom(9)
        let x = Self.ids(&rng, m * T, V), g = rng.array(m * T * D)
        let p = Preconditioner(), q = Preconditioner()
        let l = try p.addEmbedding(vocabulary: V, features: D)
        _ = try q.addEmbedding(vocabulary: V, features: D)
        try p.setTokenMode(layer: l, .perToken)
        let got = try p.naturalGradient(layer: l, batch: m, tokens: T, activations: x, outputGrads: g, mask: nil, gradScale: 2)
        let want = try q.naturalGradient(layer: l, batch: m * T, activations: x, outputGrads: g, gradScale: 2)
        #expect(got == want)
        let before = p.saveState()
        for (value, code) in [(Float(V), TENGraDError.Code.invalidArgument), (-1, .invalidArgument), (1.5, .invalidArgument),
                              (1e30, .invalidArgument), (.nan, .notFinite), (.infinity, .notFinite)] {
            var bad = x
            bad[7] = value
            refused(code) { () throws(TENGraDError) in try p.updateCurvature(layer: l, batch: m, tokens: T, activations: bad, outputGrads: g, mask: nil, gradScale: 1) }
            refused(code) { () throws(TENGraDError) in _ = try q.perSampleGradients(layer: l, batch: m, tokens: T, activations: bad, outputGrads: g, mask: nil, gradScale: 1) }
        }
        refused(.shape) { () throws(TENGraDError) in _ = try p.precondition(layer: l, weightGrad: rng.array(V * D + 1), biasGrad: nil) }
        refused(.invalidArgument) { () throws(TENGraDError) in _ = try p.addEmbedding(vocabulary: 0, features: 3) }
        refused(.invalidArgument) { () throws(TENGraDError) in _ = try p.addEmbedding(vocabulary: (1 << 24) + 1, features: 3) }
        #expect(p.saveState() == before)
        #expect(p.layerCount == 1)
        // A saved raw snapshot whose ids were altered is refused as corrupt (ids index the weight).
        let r = Preconditioner()
        let rl = try r.addEmbedding(vocabulary: V, features: D)
        try r.updateCurvature(layer: rl, batch: m, tokens: T, activations: x, outputGrads: g, mask: nil, gradScale: 1)
        var state = r.saveState()
        let needle = x.withUnsafeBytes { Array($0) }
        let at = try #require((0...(state.count - needle.count)).first { state[$0..<($0 + needle.count)].elementsEqual(needle) })
        withUnsafeBytes(of: Float(V + 3)) { for k in 0..<4 { state[at + k] = $0[k] } }
        let fresh = Preconditioner()
        do { try fresh.loadState(state); Issue.record("not refused") } catch { #expect(error.code == .corrupt) }
        #expect(fresh.layerCount == 0)
    }
}
