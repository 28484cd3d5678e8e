import Testing
@testable import TENGraD

/// Per-sample gradients as data (docs/DESIGN.md §11): the rows `perSampleGradients` writes are the
/// dense oracle's per-sample gradients; a snapshot taken from rows gathered in pieces (as a
/// layer's owner gathers them from several processes) preconditions like the dense float64
/// oracle of the whole batch; bad rows change nothing. Tolerance 1e-3 relative (LinearLayerTests).
@Suite struct PerSampleRowsTests {
    /// Splits a row [weight | bias] into weight and bias for `joined` (the oracle's layout).
    private func oracleLayout(_ row: ArraySlice<Float>, weight: Int, out: Int, perRow: Int) -> [Double] {
        let w = Array(row.prefix(weight)), b = row.count > weight ? Array(row.dropFirst(weight)) : nil
        return joined(w, b, out: out, in: perRow)
    }

    @Test(arguments: convCases)
    func convRowsAndGatheredSnapshotMatchOracle(_ c: ConvCase) throws {
        let s = c.shape
        let ho = (s.inHeight + 2 * s.paddingHeight - s.dilationHeight * (s.kernelHeight - 1) - 1) / s.strideHeight + 1
        let wo = (s.inWidth + 2 * s.paddingWidth - s.dilationWidth * (s.kernelWidth - 1) - 1) / s.strideWidth + 1
        var rng = SeededRandom(UInt64(77 + c.m * 13 + s.outChannels))
        let x = rng.array(c.m * s.inChannels * s.inHeight * s.inWidth)
        let g = rng.array(c.m * s.outChannels * ho * wo)
        let oracle = DenseOracle(conv: s, activations: x, outputGrads: g, batch: c.m, scale: 2)
        let perRow = s.inChannels / s.groups * s.kernelHeight * s.kernelWidth
        let weight = s.outChannels * perRow, d = oracle.d

        // Rows of the whole batch, and of two pieces (the first sample, the rest) joined.
        let worker = Preconditioner()
        let id = try worker.addConv2d(s)
        let rows = try worker.perSampleGradients(layer: id, batch: c.m, activations: x, outputGrads: g, gradScale: 2)
        #expect(rows.count == c.m * d)
        for i in 0..<c.m {
            #expect(relativeError(oracleLayout(rows[(i * d)..<((i + 1) * d)], weight: weight, out: s.outChannels, perRow: perRow),
                                  oracle.u[i]) <= tolerance)
        }
        #expect(try worker.stats(layer: id).batch == 0)  // no state changed
        var pieces = try worker.perSampleGradients(
            layer: id, batch: 1, activations: Array(x.prefix(x.count / c.m)), outputGrads: Array(g.prefix(g.count / c.m)), gradScale: 2)
        if c.m > 1 {
            pieces += try worker.perSampleGradients(
                layer: id, batch: c.m - 1, activations: Array(x.dropFirst(x.count / c.m)),
                outputGrads: Array(g.dropFirst(g.count / c.m)), gradScale: 2)
        }
        #expect(pieces == rows)

        // The owner's snapshot from the gathered rows: both entry paths against the oracle.
        let owner = Preconditioner()
        try owner.setDamping(0.05)
        let layer = try owner.addConv2d(s)
        try owner.setSnapshotRepresentation(layer: layer, .raw)  // rows are kept whatever the setting
        try owner.updateCurvature(layer: layer, batch: c.m, perSampleGradients: pieces)
        #expect(try owner.stats(layer: layer).representation == .perSample)
        #expect(try owner.stats(layer: layer).batch == c.m)
        let vw = rng.array(weight), vb: [Float]? = s.hasBias ? rng.array(s.outChannels) : nil
        let (w, b) = try owner.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        let v = joined(vw, vb, out: s.outChannels, in: perRow)
        #expect(relativeError(joined(w, b, out: s.outChannels, in: perRow), oracle.solve(damping: 0.05, v)) <= tolerance)
        try owner.setDamping(0.3)  // a new damping refactors the kept Gram
        let (w2, b2) = try owner.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        #expect(relativeError(joined(w2, b2, out: s.outChannels, in: perRow), oracle.solve(damping: 0.3, v)) <= tolerance)
    }

    @Test(arguments: [true, false])
    func linearRowsMatchOracle(bias: Bool) throws {
        let m = 6, n = 5, o = 4
        var rng = SeededRandom(bias ? 3 : 4)
        let a = rng.array(m * n), g = rng.array(m * o)
        let oracle = DenseOracle(activations: a, outputGrads: g, batch: m, inFeatures: n, outFeatures: o, bias: bias, scale: Double(m))
        let p = Preconditioner()
        try p.setDamping(0.1)
        let id = try p.addLinear(inFeatures: n, outFeatures: o, bias: bias)
        let rows = try p.perSampleGradients(layer: id, batch: m, activations: a, outputGrads: g, gradScale: Float(m))
        let d = oracle.d
        for i in 0..<m {
            #expect(relativeError(oracleLayout(rows[(i * d)..<((i + 1) * d)], weight: n * o, out: o, perRow: n), oracle.u[i]) <= tolerance)
        }
        try p.updateCurvature(layer: id, batch: m, perSampleGradients: rows)
        let vw = rng.array(n * o), vb: [Float]? = bias ? rng.array(o) : nil
        let (w, b) = try p.precondition(layer: id, weightGrad: vw, biasGrad: vb)
        #expect(relativeError(joined(w, b, out: o, in: n), oracle.solve(damping: 0.1, joined(vw, vb, out: o, in: n))) <= tolerance)
    }

    /// NaN rows, wrong counts, batch 0 and NaN inputs are refused; the snapshot stays as it was.
    @Test func badRowsChangeNothing() throws {
        let p = Preconditioner()
        let id = try p.addLinear(inFeatures: 3, outFeatures: 2, bias: true)
        var rng = SeededRandom(9)
        let a = rng.array(12), g = rng.array(8)
        try p.updateCurvature(layer: id, batch: 4, activations: a, outputGrads: g, gradScale: 4)
        let before = p.saveState()
        var rows = try p.perSampleGradients(layer: id, batch: 4, activations: a, outputGrads: g, gradScale: 4)
        rows[5] = .nan
        #expect(throws: TENGraDError.self) { try p.updateCurvature(layer: id, batch: 4, perSampleGradients: rows) }
        #expect(throws: TENGraDError.self) { try p.updateCurvature(layer: id, batch: 3, perSampleGradients: rows) }
        #expect(throws: TENGraDError.self) { try p.updateCurvature(layer: id, batch: 0, perSampleGradients: [Float]()) }
        #expect(throws: TENGraDError.self) { try p.updateCurvature(layer: 1, batch: 4, perSampleGradients: rows) }
        var bad = a
        bad[0] = .infinity
        #expect(throws: TENGraDError.self) {
            _ = try p.perSampleGradients(layer: id, batch: 4, activations: bad, outputGrads: g, gradScale: 4)
        }
        #expect(throws: TENGraDError.self) {
            _ = try p.perSampleGradients(layer: id, batch: 4, activations: a, outputGrads: g, gradScale: 0)
        }
        #expect(p.saveState() == before)
    }
}
