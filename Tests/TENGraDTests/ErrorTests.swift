import Testing
@testable import TENGraD

/// Every rejected call throws the documented code and leaves the preconditioner as it was: the
/// update of a fixed gradient is bit-identical before and after.
@Suite struct ErrorTests {
    let a: [Float], g: [Float], vw: [Float], vb: [Float]
    let p = Preconditioner()
    let layer: Int

    init() throws {
        var rng = SeededRandom(21)
        a = rng.array(6 * 5)
        g = rng.array(6 * 3)
        vw = rng.array(15)
        vb = rng.array(3)
        layer = try p.addLinear(inFeatures: 5, outFeatures: 3, bias: true)
        try p.updateCurvature(layer: layer, batch: 6, activations: a, outputGrads: g, gradScale: 1)
    }

    func update() throws -> [Float] {
        let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        return w + (b ?? [])
    }

    func expectCode(_ code: TENGraDError.Code, _ body: () throws -> Void) throws {
        let before = try update()
        #expect(throws: TENGraDError.self) { try body() }
        do { try body() } catch { #expect((error as? TENGraDError)?.code == code, "\(error)") }
        #expect(try update() == before)
    }

    @Test func nonFiniteInputs() throws {
        for bad in [Float.nan, .infinity, -.infinity] {
            var a2 = a
            a2[4] = bad
            try expectCode(.notFinite) { try p.updateCurvature(layer: layer, batch: 6, activations: a2, outputGrads: g, gradScale: 1) }
            var g2 = g
            g2[0] = bad
            try expectCode(.notFinite) { _ = try p.naturalGradient(layer: layer, batch: 6, activations: a, outputGrads: g2, gradScale: 1) }
            var v2 = vw
            v2[14] = bad
            try expectCode(.notFinite) { _ = try p.precondition(layer: layer, weightGrad: v2, biasGrad: vb) }
        }
    }

    @Test func shapesAndIds() throws {
        try expectCode(.shape) { try p.updateCurvature(layer: layer, batch: 5, activations: a, outputGrads: g, gradScale: 1) }
        try expectCode(.shape) { _ = try p.precondition(layer: layer, weightGrad: Array(vw.dropLast()), biasGrad: vb) }
        try expectCode(.shape) { try p.updateCurvature(layer: layer, batch: Int.max / 2, activations: a, outputGrads: g, gradScale: 1) }
        try expectCode(.invalidArgument) { try p.updateCurvature(layer: 3, batch: 6, activations: a, outputGrads: g, gradScale: 1) }
        try expectCode(.invalidArgument) { try p.updateCurvature(layer: -1, batch: 6, activations: a, outputGrads: g, gradScale: 1) }
        try expectCode(.invalidArgument) { try p.updateCurvature(layer: layer, batch: 0, activations: [], outputGrads: [], gradScale: 1) }
        try expectCode(.invalidArgument) { _ = try p.precondition(layer: layer, weightGrad: vw, biasGrad: nil) }
        try expectCode(.invalidArgument) { try p.updateCurvature(layer: layer, batch: 6, activations: a, outputGrads: g, gradScale: -1) }
        try expectCode(.invalidArgument) { try p.setDamping(0) }
        try expectCode(.invalidArgument) { try p.setDamping(.nan) }
        try expectCode(.invalidArgument) { try p.addLinear(inFeatures: 0, outFeatures: 2, bias: true) }
        try expectCode(.shape) { try p.addLinear(inFeatures: Int.max, outFeatures: 2, bias: true) }
        #expect(p.layerCount == 1)
    }

    @Test func overflowInsideIsNumerical() throws {
        let huge = a.map { $0 * 1e30 }
        try expectCode(.numerical) { try p.updateCurvature(layer: layer, batch: 6, activations: huge, outputGrads: g, gradScale: 1) }
        // A gradient near float32's limit whose update would overflow is refused, not returned as Inf.
        try p.setDamping(1e-3)
        let big = vw.map { _ in Float.greatestFiniteMagnitude / 2 }
        try expectCode(.numerical) { _ = try p.precondition(layer: layer, weightGrad: big, biasGrad: vb) }
    }

    @Test func memoryLimit() throws {
        var rng = SeededRandom(3)
        let bigA = rng.array(200 * 5), bigG = rng.array(200 * 3)
        let before = try update()
        try p.setMemoryLimit(p.memoryInUse + 1000)
        #expect(throws: TENGraDError(.outOfMemory, "")) {
            do { try p.updateCurvature(layer: layer, batch: 200, activations: bigA, outputGrads: bigG, gradScale: 1) }
            catch let e as TENGraDError { throw TENGraDError(e.code, "") }
        }
        #expect(try update() == before)
        try p.setMemoryLimit(0)
        try p.updateCurvature(layer: layer, batch: 200, activations: bigA, outputGrads: bigG, gradScale: 1)
    }

    @Test func preconditionBeforeCurvature() throws {
        let fresh = Preconditioner()
        let l = try fresh.addLinear(inFeatures: 2, outFeatures: 2, bias: false)
        #expect { _ = try fresh.precondition(layer: l, weightGrad: [1, 2, 3, 4], biasGrad: nil) } throws: { error in
            (error as? TENGraDError)?.code == .state
        }
    }

    @Test func tinyDampingStillFactorizes() throws {
        // Duplicated samples make UᵀU singular; with λ = 1e-12 the factorization may need jitter,
        // and the result must be finite either way.
        let p2 = Preconditioner()
        try p2.setDamping(1e-12)
        let l = try p2.addLinear(inFeatures: 3, outFeatures: 2, bias: false)
        let a1: [Float] = [1, 2, 3, 1, 2, 3, 1, 2, 3, 4, 5, 6]
        let g1: [Float] = [1, -1, 1, -1, 1, -1, 2, 0]
        let (w, _) = try p2.naturalGradient(layer: l, batch: 4, activations: a1, outputGrads: g1, gradScale: 1)
        #expect(w.allSatisfy { $0.isFinite })
    }
}

/// `precondition` after `setDamping` factorizes a new system; when a later allocation of the same
/// call fails, nothing may change: the saved state equals that of a handle that never failed,
/// and the next successful call gives the same update bit for bit.
@Suite struct AtomicRefactorTests {
    @Test(arguments: [SnapshotRepresentation.raw, .perSample])
    func failedPreconditionAfterSetDampingChangesNothing(_ representation: SnapshotRepresentation) throws {
        let shape = Conv2dShape(inChannels: 2, outChannels: 3, inHeight: 6, inWidth: 6, kernelHeight: 3, kernelWidth: 3)
        let m = 5
        var rng = SeededRandom(31)
        let x = rng.array(m * 2 * 36), g = rng.array(m * 3 * 16), vw = rng.array(3 * 18), vb = rng.array(3)
        func handle() throws -> (Preconditioner, Int) {
            let p = Preconditioner()
            let l = try p.addConv2d(shape)
            try p.setSnapshotRepresentation(layer: l, representation)
            try p.updateCurvature(layer: l, batch: m, activations: x, outputGrads: g, gradScale: 1)
            try p.setDamping(0.7)
            return (p, l)
        }
        let (clean, lc) = try handle()
        // Limits that stop the call at the new factor itself, and just after it (the solve's
        // workspace): both used to leave the new factorization installed.
        for extra in [8, m * m * 8 + 16] {
            let (p, l) = try handle()
            try p.setMemoryLimit(p.memoryInUse + extra)
            #expect { _ = try p.precondition(layer: l, weightGrad: vw, biasGrad: vb) } throws: {
                ($0 as? TENGraDError)?.code == .outOfMemory
            }
            try p.setMemoryLimit(0)
            #expect(p.saveState() == clean.saveState())
            #expect(try p.stats(layer: l).damping == 0.1)
            let got = try p.precondition(layer: l, weightGrad: vw, biasGrad: vb)
            let want = try clean.precondition(layer: lc, weightGrad: vw, biasGrad: vb)
            #expect(got.weight == want.weight && got.bias == want.bias)
            #expect(try p.stats(layer: l).damping == 0.7)
            // Back to the clean handle's state for the next limit.
            try clean.loadState(try handle().0.saveState())
        }
    }
}

/// Failed calls leave the memory in use as it was (a workspace grown by the call is shrunk back);
/// natural_gradient refuses update buffers that overlap its inputs; cleared updates do not count
/// in the KL clip factor.
@Suite struct MisuseTests {
    @Test func failedCallsKeepTheMemoryInUse() throws {
        let shape = Conv2dShape(inChannels: 3, outChannels: 4, inHeight: 10, inWidth: 10, kernelHeight: 3, kernelWidth: 3)
        var rng = SeededRandom(41)
        let m = 6
        let x = rng.array(m * 300), g = rng.array(m * 4 * 64)
        for representation in [SnapshotRepresentation.raw, .perSample] {
            for strategy in [ConvStrategy.factored, .explicit] {
                let p = Preconditioner()
                let l = try p.addConv2d(shape)
                try p.setSnapshotRepresentation(layer: l, representation)
                try p.setConvStrategy(layer: l, strategy)
                _ = try p.naturalGradient(layer: l, batch: 2, activations: Array(x[0..<600]), outputGrads: Array(g[0..<512]), gradScale: 1)
                let before = p.saveState(), inUse = p.memoryInUse
                // Limits at every size between "nothing more" and "almost enough": each failure
                // must leave state and memory as they were.
                var limit = inUse
                var succeeded = false
                while !succeeded {
                    try p.setMemoryLimit(limit)
                    do {
                        _ = try p.naturalGradient(layer: l, batch: m, activations: x, outputGrads: g, gradScale: 1)
                        succeeded = true
                    } catch {
                        #expect(error.code == .outOfMemory)
                        #expect(p.memoryInUse == inUse, "limit \(limit)")
                        try p.setMemoryLimit(0)  // the saved state includes the limit
                        #expect(p.saveState() == before)
                        limit += 4096
                    }
                }
                #expect(limit > inUse)  // the first limits did fail
            }
        }
    }

    @Test func naturalGradientOutputsMustNotAliasInputs() throws {
        let p = Preconditioner()
        let l = try p.addLinear(inFeatures: 4, outFeatures: 3, bias: true)
        var rng = SeededRandom(42)
        var buffer = rng.array(5 * 4 + 5 * 3 + 12)  // activations, output grads, then room
        try buffer.withUnsafeMutableBufferPointer { b in
            let a = UnsafeBufferPointer(rebasing: b[0..<20]), g = UnsafeBufferPointer(rebasing: b[20..<35])
            let fine = UnsafeMutableBufferPointer(rebasing: b[35..<47])
            var bias = [Float](repeating: 0, count: 3)
            try bias.withUnsafeMutableBufferPointer { bb in
                // Weight update over the activations, then over the output gradients: refused.
                for start in [0, 18, 25] {
                    let w = UnsafeMutableBufferPointer(rebasing: b[start..<(start + 12)])
                    #expect {
                        try p.naturalGradient(layer: l, batch: 5, activations: a, outputGrads: g, gradScale: 1, weightUpdate: w, biasUpdate: bb)
                    } throws: { ($0 as? TENGraDError)?.code == .invalidArgument }
                }
                #expect(try p.stats(layer: l).batch == 0)  // nothing was taken
                try p.naturalGradient(layer: l, batch: 5, activations: a, outputGrads: g, gradScale: 1, weightUpdate: fine, biasUpdate: bb)
            }
        }
    }

    @Test func clearedUpdatesDoNotCountInKLClipping() throws {
        let p = Preconditioner()
        var rng = SeededRandom(43)
        let a = try p.addLinear(inFeatures: 3, outFeatures: 2, bias: false), b = try p.addLinear(inFeatures: 3, outFeatures: 2, bias: false)
        for l in [a, b] { _ = try p.naturalGradient(layer: l, batch: 4, activations: rng.array(12), outputGrads: rng.array(8), gradScale: 1) }
        let both = try p.klClipFactor(learningRate: 1, klClip: 1e-6)
        p.clearUpdates()
        #expect(try p.klClipFactor(learningRate: 1, klClip: 1e-6) == 1)  // nothing this step
        _ = try p.naturalGradient(layer: a, batch: 4, activations: rng.array(12), outputGrads: rng.array(8), gradScale: 1)
        let onlyA = try p.klClipFactor(learningRate: 1, klClip: 1e-6)
        let dotA = try p.stats(layer: a).updateDotGrad
        #expect(abs(onlyA - (1e-6 / dotA).squareRoot()) <= 1e-12 && onlyA != both)
    }
}
