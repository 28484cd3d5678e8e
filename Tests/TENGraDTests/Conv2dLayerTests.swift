import Testing
@testable import TENGraD

/// Conv2d against the dense float64 oracle (per-sample gradients by direct summation), both Gram
/// strategies forced, both entry points. Tolerance 1e-3 relative: see LinearLayerTests.
struct ConvCase: CustomTestStringConvertible, Sendable {
    var name: String, m: Int, shape: Conv2dShape
    var testDescription: String { name }
}

let convCases: [ConvCase] = [
    ConvCase(name: "3x3 pad 1", m: 3, shape: Conv2dShape(inChannels: 2, outChannels: 3, inHeight: 6, inWidth: 5, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)),
    ConvCase(name: "stride 2 dilation 2 groups 2", m: 4, shape: Conv2dShape(inChannels: 4, outChannels: 6, inHeight: 8, inWidth: 7, kernelHeight: 3, kernelWidth: 3, strideHeight: 2, strideWidth: 2, paddingHeight: 1, paddingWidth: 2, dilationHeight: 2, dilationWidth: 2, groups: 2)),
    ConvCase(name: "depthwise no bias", m: 2, shape: Conv2dShape(inChannels: 3, outChannels: 3, inHeight: 5, inWidth: 5, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1, groups: 3, hasBias: false)),
    ConvCase(name: "1x1", m: 5, shape: Conv2dShape(inChannels: 3, outChannels: 2, inHeight: 3, inWidth: 4, kernelHeight: 1, kernelWidth: 1)),
    ConvCase(name: "L = 1, batch 1", m: 1, shape: Conv2dShape(inChannels: 2, outChannels: 2, inHeight: 3, inWidth: 3, kernelHeight: 3, kernelWidth: 3)),
    // Stride 1 with rows long enough for the shifted products (Conv2dShifted), a remainder chunk.
    ConvCase(name: "shifted, 3x2 dilation (1, 2)", m: 11, shape: Conv2dShape(inChannels: 8, outChannels: 3, inHeight: 14, inWidth: 13, kernelHeight: 3, kernelWidth: 2, paddingHeight: 1, paddingWidth: 2, dilationWidth: 2)),
    ConvCase(name: "shifted, groups 2 no bias no padding", m: 3, shape: Conv2dShape(inChannels: 16, outChannels: 4, inHeight: 14, inWidth: 16, kernelHeight: 3, kernelWidth: 3, groups: 2, hasBias: false)),
]

@Suite struct Conv2dLayerTests {
    @Test(arguments: convCases, [ConvStrategy.factored, .explicit])
    func bothEntryPointsMatchOracle(_ c: ConvCase, strategy: ConvStrategy) throws {
        let s = c.shape
        let ho = (s.inHeight + 2 * s.paddingHeight - s.dilationHeight * (s.kernelHeight - 1) - 1) / s.strideHeight + 1
        let wo = (s.inWidth + 2 * s.paddingWidth - s.dilationWidth * (s.kernelWidth - 1) - 1) / s.strideWidth + 1
        var rng = SeededRandom(UInt64(c.m * 1000 + s.inChannels * 10 + s.outChannels))
        let x = rng.array(c.m * s.inChannels * s.inHeight * s.inWidth)
        let g = rng.array(c.m * s.outChannels * ho * wo)
        for representation in [SnapshotRepresentation.raw, .perSample] {
        let p = Preconditioner()
        try p.setDamping(0.05)
        let layer = try p.addConv2d(s)
        try p.setConvStrategy(layer: layer, strategy)
        try p.setSnapshotRepresentation(layer: layer, representation)
        let (w, b) = try p.naturalGradient(layer: layer, batch: c.m, activations: x, outputGrads: g, gradScale: 2)
        let oracle = DenseOracle(conv: s, activations: x, outputGrads: g, batch: c.m, scale: 2)
        let perRow = s.inChannels / s.groups * s.kernelHeight * s.kernelWidth
        #expect(relativeError(joined(w, b, out: s.outChannels, in: perRow), oracle.solve(damping: 0.05, oracle.meanGradient)) <= tolerance)
        #expect(try p.stats(layer: layer).convStrategy == strategy)
        #expect(try p.stats(layer: layer).representation == representation)

        let vw = rng.array(w.count), vb: [Float]? = s.hasBias ? rng.array(s.outChannels) : nil
        let (w2, b2) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        let want = oracle.solve(damping: 0.05, joined(vw, vb, out: s.outChannels, in: perRow))
        #expect(relativeError(joined(w2, b2, out: s.outChannels, in: perRow), want) <= tolerance)

        // Reuse path after a damping change, and after a refresh by update_curvature.
        try p.setDamping(0.3)
        let (w3, b3) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        #expect(relativeError(joined(w3, b3, out: s.outChannels, in: perRow), oracle.solve(damping: 0.3, joined(vw, vb, out: s.outChannels, in: perRow))) <= tolerance)
        try p.updateCurvature(layer: layer, batch: c.m, activations: x, outputGrads: g, gradScale: 2)
        let (w4, b4) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        #expect(relativeError(joined(w4, b4, out: s.outChannels, in: perRow), oracle.solve(damping: 0.3, joined(vw, vb, out: s.outChannels, in: perRow))) <= tolerance)
        }
    }

    /// Which convolutions form per-sample gradients by shifted products instead of unfolding.
    @Test func shiftedProductsApplyToLongStrideOneRows() throws {
        #expect(try Conv2dGeometry(convCases[5].shape).shifted != nil)
        #expect(try Conv2dGeometry(convCases[6].shape).shifted != nil)
        #expect(try Conv2dGeometry(convCases[0].shape).shifted == nil)  // rows too short
        var strided = convCases[5].shape
        strided.strideWidth = 2
        #expect(try Conv2dGeometry(strided).shifted == nil)
    }

    /// A per-sample snapshot, the explicit Gram of a raw one and the data-parallel rows formed on
    /// two threads (a half of the samples each, BLAS on one thread per call: BLAS threads 2 and at
    /// least two chunks), for the shifted products and for unfolding: the oracle's U (the same
    /// bits as on one thread) and block; a NaN or Inf in either half is refused
    /// with that input named and nothing changed — the first half's when both halves hold one.
    @Test func perSampleFormedOnTwoThreads() throws {
        let shapes = [
            Conv2dShape(inChannels: 8, outChannels: 4, inHeight: 28, inWidth: 28, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1),
            Conv2dShape(inChannels: 3, outChannels: 5, inHeight: 40, inWidth: 40, kernelHeight: 3, kernelWidth: 3, strideHeight: 2, strideWidth: 2, paddingHeight: 1, paddingWidth: 1),
        ]
        for (n, s) in shapes.enumerated() {
            let k = BlockKernel(try Conv2dGeometry(s))
            let m = 40
            let chunk = k.formChunk(m: m, available: 1 << 24)
            #expect(m >= 2 * chunk, "shape \(n): one chunk of \(chunk) holds every sample")
            #expect((try Conv2dGeometry(s).shifted != nil) == (n == 0))
            var rng = SeededRandom(UInt64(40 + n))
            let x = rng.array(m * k.dims.inputSize), g = rng.array(m * k.dims.outputSize)
            let oracle = DenseOracle(conv: s, activations: x, outputGrads: g, batch: m, scale: 1)
            let perRow = s.inChannels * s.kernelHeight * s.kernelWidth
            let vw = rng.array(k.dims.weightCount), vb = rng.array(s.outChannels)
            let want = oracle.solve(damping: 0.1, joined(vw, vb, out: s.outChannels, in: perRow))
            // The rows for data-parallel training: the oracle's U, the same bits on either count.
            var rows: [[Float]] = []
            for threads in [2, 1] {
                let p = Preconditioner()
                try p.setBLASThreads(threads)
                let layer = try p.addConv2d(s)
                rows.append(try p.perSampleGradients(layer: layer, batch: m, activations: x, outputGrads: g, gradScale: 1))
            }
            #expect(rows[0] == rows[1])
            let d = k.dims.parameters, wc = k.dims.weightCount
            var got: [Double] = []
            for i in 0..<m {
                let row = Array(rows[0][(i * d)..<((i + 1) * d)])
                got += joined(Array(row[0..<wc]), Array(row[wc...]), out: s.outChannels, in: perRow)
            }
            #expect(relativeError(got, oracle.u.flatMap { $0 }) <= tolerance)
            for representation in [SnapshotRepresentation.perSample, .raw] {  // raw: the explicit Gram's whole U
            var results: [[Float]] = []
            for threads in [2, 1] {
                let p = Preconditioner()
                try p.setDamping(0.1)
                try p.setBLASThreads(threads)
                let layer = try p.addConv2d(s)
                try p.setConvStrategy(layer: layer, .explicit)
                try p.setSnapshotRepresentation(layer: layer, representation)
                try p.updateCurvature(layer: layer, batch: m, activations: x, outputGrads: g, gradScale: 1)
                let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
                #expect(relativeError(joined(w, b, out: s.outChannels, in: perRow), want) <= tolerance)
                results.append(w + (b ?? []))
                guard threads == 2 else { continue }
                for (badA, badG) in [(m - 3, -1), (-1, m - 1), (m - 2, 1), (2, -1)] {
                    var x2 = x, g2 = g
                    if badA >= 0 { x2[badA * k.dims.inputSize + 5] = .nan }
                    if badG >= 0 { g2[badG * k.dims.outputSize + 7] = .infinity }
                    do {
                        try p.updateCurvature(layer: layer, batch: m, activations: x2, outputGrads: g2, gradScale: 1)
                        Issue.record("shape \(n): a NaN or Inf in samples \(badA), \(badG) was accepted")
                    } catch {
                        #expect(error.code == .notFinite)
                        // A raw snapshot scans the whole batch's activations first, a per-sample
                        // one each chunk's activations and output gradients in sample order.
                        let first = representation == .raw ? (badA >= 0 ? "activations" : "output_grads")
                            : badG >= 0 && (badA < 0 || badG < badA) ? "output_grads" : "activations"
                        #expect(error.message.hasPrefix(first), "\(error)")
                    }
                    let (w2, b2) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
                    #expect(w2 + (b2 ?? []) == results[0])
                }
            }
            }
        }
    }

    /// The explicit Gram in blocks of output channels (U does not fit the workspace) and whole,
    /// both with the shifted products: the oracle's Gram.
    @Test func shiftedProductsInChannelBlocks() throws {
        let s = Conv2dShape(inChannels: 8, outChannels: 6, inHeight: 14, inWidth: 14, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)
        let m = 10
        var rng = SeededRandom(21)
        let x = rng.array(m * 8 * 196), g = rng.array(m * 6 * 196)
        let k = BlockKernel(try Conv2dGeometry(s))
        let oracle = DenseOracle(conv: s, activations: x, outputGrads: g, batch: m, scale: 1)
        var want = [Double](repeating: 0, count: m * m)
        for i in 0..<m { for j in 0..<m { want[i * m + j] = zip(oracle.u[i], oracle.u[j]).reduce(0) { $0 + $1.0 * $1.1 } } }
        let whole = try k.explicitPlan(m: m, available: 1 << 22)
        let blocks = try k.explicitPlan(m: m, available: m * m + m * 2 * 73 + k.geometry.formScratch(samples: 1))
        #expect(whole.whole && !blocks.whole && blocks.channels < 6)
        for plan in [whole, blocks] {
            var gram = [Double](repeating: 0, count: m * m)
            var work = [Float](repeating: .nan, count: plan.floats)
            x.withUnsafeBufferPointer { xp in g.withUnsafeBufferPointer { gp in gram.withUnsafeMutableBufferPointer { kp in
                work.withUnsafeMutableBufferPointer { wp in
                    _ = k.explicitGram(m: m, a: xp.baseAddress!, g: gp.baseAddress!, into: kp.baseAddress!, plan: plan, work: wp.baseAddress!)
                } } } }
            #expect(relativeError(gram, want) <= tolerance)
        }
    }

    /// The cost model: per-sample gradients for a convolution with many positions, the raw batch
    /// for few positions and for linear layers; a memory limit too small for U falls back to raw;
    /// forcing per-sample then is an out-of-memory error that changes nothing.
    @Test func representationModelPicksAndRespectsTheMemoryLimit() throws {
        var rng = SeededRandom(11)
        let wide = Conv2dShape(inChannels: 2, outChannels: 4, inHeight: 8, inWidth: 8, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)
        let small = Conv2dShape(inChannels: 4, outChannels: 4, inHeight: 2, inWidth: 2, kernelHeight: 1, kernelWidth: 1)
        let m = 6
        let p = Preconditioner()
        let l1 = try p.addConv2d(wide), l2 = try p.addConv2d(small)
        let x1 = rng.array(m * 2 * 64), g1 = rng.array(m * 4 * 64), x2 = rng.array(m * 16), g2 = rng.array(m * 16)
        try p.updateCurvature(layer: l1, batch: m, activations: x1, outputGrads: g1, gradScale: 1)
        try p.updateCurvature(layer: l2, batch: m, activations: x2, outputGrads: g2, gradScale: 1)
        let s1 = try p.stats(layer: l1), s2 = try p.stats(layer: l2)
        #expect(s1.representation == .perSample && s1.representationBytes == 4 * m * (4 * 19))
        #expect(s1.perSampleReuseCost < s1.rawReuseCost)
        #expect(s2.representation == .raw && s2.representationBytes == 4 * m * (16 + 16))

        // A limit that leaves room for the raw batch but not for U (U is 2.4× larger here).
        let q = Preconditioner()
        let l = try q.addConv2d(wide)
        try q.updateCurvature(layer: l, batch: m, activations: x1, outputGrads: g1, gradScale: 1)
        try q.setSnapshotRepresentation(layer: l, .raw)
        try q.updateCurvature(layer: l, batch: m, activations: x1, outputGrads: g1, gradScale: 1)
        try q.setMemoryLimit(q.memoryInUse + 4 * m * 70)
        try q.setSnapshotRepresentation(layer: l, .auto)
        try q.updateCurvature(layer: l, batch: m, activations: x1, outputGrads: g1, gradScale: 1)
        #expect(try q.stats(layer: l).representation == .raw)
        let before = q.saveState()
        try q.setSnapshotRepresentation(layer: l, .perSample)
        #expect { try q.updateCurvature(layer: l, batch: m, activations: x1, outputGrads: g1, gradScale: 1) } throws: {
            ($0 as? TENGraDError)?.code == .outOfMemory
        }
        try q.setSnapshotRepresentation(layer: l, .auto)
        #expect(q.saveState() == before)
    }

    @Test func invalidGeometryNamesTheField() throws {
        let p = Preconditioner()
        var bad = Conv2dShape(inChannels: 3, outChannels: 4, inHeight: 5, inWidth: 5, kernelHeight: 3, kernelWidth: 3, groups: 2)
        #expect { try p.addConv2d(bad) } throws: { ($0 as? TENGraDError)?.message.contains("in_channels") == true }
        bad = Conv2dShape(inChannels: 1, outChannels: 1, inHeight: 5, inWidth: 5, kernelHeight: 3, kernelWidth: 7)
        #expect { try p.addConv2d(bad) } throws: { ($0 as? TENGraDError)?.message.contains("kernel_width") == true }
        bad = Conv2dShape(inChannels: 1, outChannels: 1, inHeight: 5, inWidth: 5, kernelHeight: 3, kernelWidth: 3, dilationHeight: 0)
        #expect { try p.addConv2d(bad) } throws: { ($0 as? TENGraDError)?.code == .invalidArgument }
        bad = Conv2dShape(inChannels: Int.max / 4, outChannels: 2, inHeight: 1 << 20, inWidth: 1 << 20, kernelHeight: 1, kernelWidth: 1)
        #expect { try p.addConv2d(bad) } throws: { ($0 as? TENGraDError)?.code == .shape }
        #expect(p.layerCount == 0)
        let linear = try p.addLinear(inFeatures: 2, outFeatures: 2, bias: false)
        try p.setConvStrategy(layer: linear, .explicit)  // linear layers take it (it matters over tokens)
        #expect { try p.setConvStrategy(layer: 7, .explicit) } throws: { ($0 as? TENGraDError)?.code == .invalidArgument }
    }
}
