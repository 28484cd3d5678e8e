import Testing
@testable import TENGraD

/// Numerical edge cases and their documented outcomes (README, "Numerical behaviour").
@Suite struct EdgeCaseTests {
    /// The gradient's validation over a large array, in two halves on two threads: the same sum of
    /// squares and bound as a float64 loop, and a NaN or Inf in either half found.
    @Test func largeGradientScanOnTwoThreads() throws {
        let n = twoThreadArrayCount + 7
        var rng = SeededRandom(5)
        var v = rng.array(n)
        var want = 0.0
        for x in v { want += Double(x) * Double(x) }
        for threads in [1, 2] {
            let scan = BLAS.withThreads(threads) { v.withUnsafeBufferPointer { GradientScan($0.baseAddress!, count: n) } }
            #expect(scan.finite && abs(scan.sumSquares - want) <= 1e-9 * want && scan.maxAbs >= Double(v.map { abs($0) }.max()!))
        }
        for (index, bad) in [(3, Float.nan), (n - 2, Float.infinity)] {
            let saved = v[index]
            v[index] = bad
            let scan = BLAS.withThreads(2) { v.withUnsafeBufferPointer { GradientScan($0.baseAddress!, count: n) } }
            #expect(!scan.finite)
            v[index] = saved
        }
    }

    /// The validation's float64 sum of exact squares: finite for the largest finite floats (their
    /// squares overflow float32, not a double), not finite for a NaN or ±Inf anywhere, including
    /// the tail after the last 16-float block; the sum is the float64 loop's.
    @Test func gradientScanOfHugeAndNonFiniteValues() throws {
        for n in [5, 16, 37] {
            var v = [Float](repeating: 0, count: n)
            for i in 0..<n { v[i] = (i % 2 == 0 ? 1 : -1) * Float.greatestFiniteMagnitude / Float(i + 1) }
            var want = 0.0
            for x in v { want += Double(x) * Double(x) }
            let scan = v.withUnsafeBufferPointer { GradientScan($0.baseAddress!, count: n) }
            #expect(scan.finite && abs(scan.sumSquares - want) <= 1e-12 * want)
            #expect(scan.maxAbs >= Double(Float.greatestFiniteMagnitude))
            for index in [0, n / 2, n - 1] {
                for bad in [Float.nan, .infinity, -.infinity] {
                    var w = v
                    w[index] = bad
                    let s = w.withUnsafeBufferPointer { GradientScan($0.baseAddress!, count: n) }
                    #expect(!s.finite)
                }
            }
        }
    }

    /// The (1/λ) v pass of a precondition: every entry β·x rounded once (the bits of a scalar
    /// loop), on one thread and in two halves on two, out of place and in place; β = 1 copies.
    @Test func scaledCopyOnOneAndTwoThreads() throws {
        for n in [37, twoThreadArrayCount + 7] {
            var rng = SeededRandom(9)
            let v = rng.array(n)
            let beta: Float = 1 / 0.3
            let want = v.map { beta * $0 }
            for threads in [1, 2] {
                var out = [Float](repeating: .nan, count: n)
                BLAS.withThreads(threads) {
                    v.withUnsafeBufferPointer { x in
                        out.withUnsafeMutableBufferPointer { Reduce.scale(x.baseAddress!, by: beta, into: $0.baseAddress!, n) }
                    }
                }
                #expect(out == want)
                var inPlace = v
                BLAS.withThreads(threads) {
                    inPlace.withUnsafeMutableBufferPointer { Reduce.scale(UnsafePointer($0.baseAddress!), by: beta, into: $0.baseAddress!, n) }
                }
                #expect(inPlace == want)
                var copy = [Float](repeating: 0, count: n)
                BLAS.withThreads(threads) {
                    v.withUnsafeBufferPointer { x in
                        copy.withUnsafeMutableBufferPointer { Reduce.scale(x.baseAddress!, by: 1, into: $0.baseAddress!, n) }
                    }
                }
                #expect(copy == v)
            }
        }
    }

    @Test func zeroOutputGradientsGiveZeroUpdateAndPureDampingPreconditioner() throws {
        // U = 0: F = 0, so (F + λI)⁻¹ v = v/λ and the mean gradient's update is exactly 0.
        var rng = SeededRandom(1)
        let p = Preconditioner()
        try p.setDamping(0.25)
        let layer = try p.addLinear(inFeatures: 4, outFeatures: 3, bias: true)
        let (w, b) = try p.naturalGradient(layer: layer, batch: 5, activations: rng.array(20), outputGrads: [Float](repeating: 0, count: 15), gradScale: 5)
        #expect(w.allSatisfy { $0 == 0 } && b!.allSatisfy { $0 == 0 })
        let v = rng.array(12), vb = rng.array(3)
        let (w2, b2) = try p.precondition(layer: layer, weightGrad: v, biasGrad: vb)
        #expect(w2 == v.map { $0 * 4 } && b2! == vb.map { $0 * 4 })
    }

    @Test func zeroActivationsLeaveOnlyTheBiasBlock() throws {
        // A = 0 with a bias: per-sample gradients are [0 | s·g_i]; the oracle agrees.
        var rng = SeededRandom(2)
        let g = rng.array(6 * 2), a = [Float](repeating: 0, count: 6 * 3)
        let p = Preconditioner()
        let layer = try p.addLinear(inFeatures: 3, outFeatures: 2, bias: true)
        let (w, b) = try p.naturalGradient(layer: layer, batch: 6, activations: a, outputGrads: g, gradScale: 1)
        let oracle = DenseOracle(activations: a, outputGrads: g, batch: 6, inFeatures: 3, outFeatures: 2, bias: true, scale: 1)
        #expect(w.allSatisfy { $0 == 0 })
        #expect(relativeError(joined(w, b, out: 2, in: 3), oracle.solve(damping: 0.1, oracle.meanGradient)) <= tolerance)
    }

    @Test func duplicatedSamplesRankDeficientGram() throws {
        // Four copies of two samples: K has rank 2; K + mλI is still positive definite.
        var rng = SeededRandom(3)
        let a1 = rng.array(10), g1 = rng.array(6)
        let a = Array([[Float]](repeating: a1, count: 4).joined()), g = Array([[Float]](repeating: g1, count: 4).joined())
        let p = Preconditioner()
        try p.setDamping(0.01)
        let layer = try p.addLinear(inFeatures: 5, outFeatures: 3, bias: false)
        let (w, _) = try p.naturalGradient(layer: layer, batch: 8, activations: a, outputGrads: g, gradScale: 1)
        let oracle = DenseOracle(activations: a, outputGrads: g, batch: 8, inFeatures: 5, outFeatures: 3, bias: false, scale: 1)
        #expect(relativeError(w.map(Double.init), oracle.solve(damping: 0.01, oracle.meanGradient)) <= tolerance)
        #expect(try p.stats(layer: layer).jitter == 0)
    }

    @Test func batchLargerThanParameterCount() throws {
        // m = 64 > d = 3·(2+1) = 9: K is 64×64 of rank ≤ 9. The Woodbury form stays within the
        // contract's bound; its float32 combination U x cancels a null-space component, so the
        // error (~1e-5) is larger than for m < d (~1e-7).
        var rng = SeededRandom(4)
        let a = rng.array(64 * 2), g = rng.array(64 * 3)
        let p = Preconditioner()
        try p.setDamping(0.01)
        let layer = try p.addLinear(inFeatures: 2, outFeatures: 3, bias: true)
        let (w, b) = try p.naturalGradient(layer: layer, batch: 64, activations: a, outputGrads: g, gradScale: 1)
        let oracle = DenseOracle(activations: a, outputGrads: g, batch: 64, inFeatures: 2, outFeatures: 3, bias: true, scale: 1)
        #expect(relativeError(joined(w, b, out: 3, in: 2), oracle.solve(damping: 0.01, oracle.meanGradient)) <= tolerance)
        let v = rng.array(6), vb = rng.array(3)
        let (w2, b2) = try p.precondition(layer: layer, weightGrad: v, biasGrad: vb)
        #expect(relativeError(joined(w2, b2, out: 3, in: 2), oracle.solve(damping: 0.01, joined(v, vb, out: 3, in: 2))) <= tolerance)
    }

    @Test func vanishingDampingUsesJitterAndStaysFinite() throws {
        // Duplicated samples make K singular; with λ = 1e-30 the Cholesky of K + mλI meets a
        // non-positive pivot in rounding, retries with jitter (reported in stats), and returns a
        // finite update.
        var rng = SeededRandom(5)
        let a1 = rng.array(6), g1 = rng.array(4)
        let a = Array([[Float]](repeating: a1, count: 6).joined()), g = Array([[Float]](repeating: g1, count: 6).joined())
        for damping in [1e-12, 1e-30] {
            let p = Preconditioner()
            try p.setDamping(damping)
            let layer = try p.addLinear(inFeatures: 6, outFeatures: 4, bias: false)
            let (w, _) = try p.naturalGradient(layer: layer, batch: 6, activations: a, outputGrads: g, gradScale: 1)
            #expect(w.allSatisfy { $0.isFinite })
            let s = try p.stats(layer: layer)
            #expect(s.jitter >= 0 && s.jitter.isFinite)
            if damping == 1e-30 { #expect(s.jitter > 0) }
        }
    }

    @Test func nearOverflowMagnitudesAreRefusedNotReturnedAsInf() throws {
        var rng = SeededRandom(6)
        let p = Preconditioner()
        let layer = try p.addLinear(inFeatures: 4, outFeatures: 2, bias: true)
        let a = rng.array(12), g = rng.array(6)
        // Gram overflow: |a|·|g| near 1e38 makes K = Σ (a·a)(g·g) overflow.
        #expect { try p.updateCurvature(layer: layer, batch: 3, activations: a.map { $0 * 1e20 }, outputGrads: g.map { $0 * 1e20 }, gradScale: 1) } throws: {
            ($0 as? TENGraDError)?.code == .numerical
        }
        // Update overflow: a finite gradient near FLT_MAX with a small λ.
        try p.updateCurvature(layer: layer, batch: 3, activations: a, outputGrads: g, gradScale: 1)
        try p.setDamping(1e-6)
        let (w, b) = try p.precondition(layer: layer, weightGrad: rng.array(8), biasGrad: rng.array(2))
        #expect(w.allSatisfy { $0.isFinite } && b!.allSatisfy { $0.isFinite })
        #expect { _ = try p.precondition(layer: layer, weightGrad: [Float](repeating: 3e38, count: 8), biasGrad: [1, 1]) } throws: {
            ($0 as? TENGraDError)?.code == .numerical
        }
    }

    @Test func checksumIsXXH64() {
        // Reference values of XXH64 with seed 0.
        let empty: [UInt8] = [], abc: [UInt8] = Array("abc".utf8), hundred = (0..<100).map { UInt8($0) }
        #expect(empty.withUnsafeBytes { xxh64($0.baseAddress ?? UnsafeRawPointer(bitPattern: 1)!, count: 0) } == 0xEF46_DB37_51D8_E999)
        #expect(abc.withUnsafeBytes { xxh64($0.baseAddress!, count: 3) } == 0x44BC_2CF5_AD77_0999)
        #expect(hundred.withUnsafeBytes { xxh64($0.baseAddress!, count: 100) } == 0x6AC1_E580_3216_6597)
    }

    @Test func stateRoundTripThroughTheSwiftAPI() throws {
        var rng = SeededRandom(7)
        let p = Preconditioner()
        try p.setDamping(0.3)
        let fc = try p.addLinear(inFeatures: 5, outFeatures: 4, bias: true)
        let conv = try p.addConv2d(Conv2dShape(inChannels: 2, outChannels: 2, inHeight: 4, inWidth: 4, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1))
        try p.updateCurvature(layer: fc, batch: 3, activations: rng.array(15), outputGrads: rng.array(12), gradScale: 3)
        try p.updateCurvature(layer: conv, batch: 2, activations: rng.array(64), outputGrads: rng.array(64), gradScale: 2)
        let blob = p.saveState()
        #expect(blob.count == p.stateSize)
        let q = Preconditioner()
        try q.loadState(blob)
        #expect(q.layerCount == 2 && q.damping == 0.3)
        #expect(try q.layerDescription(layer: conv) == p.layerDescription(layer: conv))
        let v = rng.array(20), vb = rng.array(4)
        #expect(try q.precondition(layer: fc, weightGrad: v, biasGrad: vb) == p.precondition(layer: fc, weightGrad: v, biasGrad: vb))
        var damaged = blob
        damaged[damaged.count / 2] ^= 0xFF
        #expect { try q.loadState(damaged) } throws: { ($0 as? TENGraDError)?.code == .corrupt }
        #expect { try q.loadState(Array(blob.dropLast(3))) } throws: { ($0 as? TENGraDError)?.code == .corrupt }
    }
}
