import CKernels
import Testing
@testable import TENGraD

/// The passes outside BLAS (`Reduce`): the AVX2 kernels (Sources/CKernels/passes.c), where this
/// CPU has them, against a float64 oracle and against the portable Swift loops.
@Suite struct PassesTests {
    /// Lengths that end in every tail: the 32-float block, the 4-float step, single floats.
    static let lengths = [0, 1, 3, 4, 5, 31, 32, 33, 36, 37, 64, 100, 1027]

    @Test func sumOfSquaresMatchesTheFloat64Loop() {
        var rng = SeededRandom(21)
        for n in PassesTests.lengths {
            let v = rng.array(n).map { $0 * 1e3 }
            var want = 0.0
            for x in v { want += Double(x) * Double(x) }
            let (got, portable) = v.withUnsafeBufferPointer { p in
                (Reduce.sumOfSquares(p.baseAddress ?? UnsafePointer(bitPattern: 64)!, n),
                 Reduce.portableSumOfSquares(p.baseAddress ?? UnsafePointer(bitPattern: 64)!, n))
            }
            // Exact squares, sums in another order: a few float64 roundings apart.
            #expect(abs(got - want) <= 1e-14 * max(want, 1), "n = \(n)")
            #expect(abs(portable - want) <= 1e-14 * max(want, 1), "n = \(n)")
        }
    }

    /// A NaN or ±Inf at any position — every accumulator's lanes, the 4-float step, the scalar
    /// tail — makes the sum non-finite; the largest finite floats do not.
    @Test func sumOfSquaresFindsEveryNonFiniteEntry() {
        let n = 71  // two 32-blocks, one 4-step, three single floats
        let huge = [Float](repeating: Float.greatestFiniteMagnitude, count: n)
        let sum = huge.withUnsafeBufferPointer { Reduce.sumOfSquares($0.baseAddress!, n) }
        #expect(sum.isFinite && sum >= Double(n) * Double(Float.greatestFiniteMagnitude) * Double(Float.greatestFiniteMagnitude) * 0.999)
        for index in 0..<n {
            for bad in [Float.nan, .infinity, -.infinity] {
                var v = [Float](repeating: 0.5, count: n)
                v[index] = bad
                let s = v.withUnsafeBufferPointer { Reduce.sumOfSquares($0.baseAddress!, n) }
                #expect(!s.isFinite, "index \(index), \(bad)")
            }
        }
    }

    /// β x rounded once per entry: the same bits as the portable loop and a scalar product, out of
    /// place and in place.
    @Test func scaleIsOneRoundingPerEntry() {
        var rng = SeededRandom(22)
        for n in PassesTests.lengths where n > 0 {
            let v = rng.array(n)
            let beta: Float = 1 / 0.3
            let want = v.map { beta * $0 }
            var out = [Float](repeating: .nan, count: n), portable = out, inPlace = v
            v.withUnsafeBufferPointer { x in
                out.withUnsafeMutableBufferPointer { Reduce.scale(x.baseAddress!, by: beta, into: $0.baseAddress!, n) }
                portable.withUnsafeMutableBufferPointer { Reduce.portableScale(x.baseAddress!, by: beta, into: $0.baseAddress!, n) }
            }
            inPlace.withUnsafeMutableBufferPointer { Reduce.scale(UnsafePointer($0.baseAddress!), by: beta, into: $0.baseAddress!, n) }
            #expect(out == want && portable == want && inPlace == want, "n = \(n)")
        }
    }

    /// The stores around the cache (out of place, from 16 MiB): every alignment of the output
    /// (the scalar lead-in up to 32 bytes, the streamed blocks, the tail) gives the scalar
    /// product's bits; and one array past the threshold through `Reduce.scale`, out of place (in
    /// two halves) and in place (OpenBLAS's sscal): the same bits.
    @Test func streamedScaleIsOneRoundingPerEntry() {
        var rng = SeededRandom(25)
        let beta: Float = -1 / 0.7
        if Reduce.wide {
            for n in PassesTests.lengths {
                let v = rng.array(n), want = v.map { beta * $0 }
                for offset in 0..<8 {
                    var out = [Float](repeating: .nan, count: n + 8)
                    v.withUnsafeBufferPointer { x in
                        out.withUnsafeMutableBufferPointer { tengrad_k_scale(x.baseAddress!, beta, $0.baseAddress! + offset, Int64(n), 1) }
                    }
                    #expect(Array(out[offset..<offset + n]) == want, "n \(n) offset \(offset)")
                    #expect(out[..<offset].allSatisfy { $0.isNaN } && out[(offset + n)...].allSatisfy { $0.isNaN }, "n \(n) offset \(offset)")
                }
            }
        }
        let n = twoThreadArrayCount + 37
        let v = rng.array(n)
        var out = [Float](repeating: .nan, count: n + 1)
        v.withUnsafeBufferPointer { x in
            out.withUnsafeMutableBufferPointer { Reduce.scale(x.baseAddress!, by: beta, into: $0.baseAddress! + 1, n) }
        }
        var inPlace = v
        inPlace.withUnsafeMutableBufferPointer { Reduce.scale(UnsafePointer($0.baseAddress!), by: beta, into: $0.baseAddress!, n) }
        var mismatches = 0, inPlaceMismatches = 0
        for i in 0..<n {
            if out[i + 1] != beta * v[i] { mismatches += 1 }
            if inPlace[i] != beta * v[i] { inPlaceMismatches += 1 }
        }
        #expect(mismatches == 0 && out[0].isNaN)
        #expect(inPlaceMismatches == 0, "in place (OpenBLAS's sscal)")
    }

    /// A layer past the large-array threshold (2048², 4M weights): the out-of-place update (its
    /// (1/λ)v streamed, in two halves) and the in-place one (OpenBLAS's sscal) have the same bits.
    @Test func largeLayerInPlaceIsOutOfPlace() throws {
        let n = 2048, m = 3
        #expect(n * n >= twoThreadArrayCount)
        var rng = SeededRandom(26)
        let a = rng.array(m * n), g = rng.array(m * n), vw = rng.array(n * n), vb = rng.array(n)
        let p = Preconditioner()
        let layer = try p.addLinear(inFeatures: n, outFeatures: n, bias: true)
        try p.updateCurvature(layer: layer, batch: m, activations: a, outputGrads: g, gradScale: Float(m))
        let (w, b) = try p.precondition(layer: layer, weightGrad: vw, biasGrad: vb)
        var inPlaceW = vw, inPlaceB = vb
        try inPlaceW.withUnsafeMutableBufferPointer { wp in
            try inPlaceB.withUnsafeMutableBufferPointer { bp in
                try p.precondition(layer: layer, weightGrad: UnsafeBufferPointer(wp), biasGrad: UnsafeBufferPointer(bp),
                                   weightUpdate: wp, biasUpdate: bp)
            }
        }
        #expect(inPlaceW == w && inPlaceB == b)
        #expect(w.allSatisfy { $0.isFinite } && w != vw)
    }

    /// The Gram's mirror copies one side onto the other exactly as the portable tiles do, for
    /// diagonal blocks (only below the diagonal) and off-diagonal ones, at offsets and sizes in
    /// and out of the 4 × 4 blocks, and touches nothing else.
    @Test func mirrorMatchesThePortableTiles() {
        var rng = SeededRandom(27)
        for m in [1, 5, 8, 13, 32, 37] {
            var regions: [(Range<Int>, Range<Int>, Bool)] = [(0..<m, 0..<m, true)]
            if m >= 5 { regions += [(1..<m, 1..<m, true), (3..<m, 0..<3, false), (m / 2..<m, 0..<m / 2, false)] }
            if m >= 13 { regions += [(8..<13, 1..<8, false), (4..<m - 1, 4..<m - 1, true)] }
            for (rows, cols, below) in regions {
                let start = rng.array(m * m).map { Double($0) }
                var got = start, want = start
                got.withUnsafeMutableBufferPointer { BlockKernel.mirror($0.baseAddress!, m: m, rows: rows, cols: cols, below: below) }
                want.withUnsafeMutableBufferPointer {
                    BlockKernel.portableMirror($0.baseAddress!, m: m, rows: rows, cols: cols, below: below)
                }
                var scalar = start
                for i in rows { for j in cols where !below || j < i { scalar[j * m + i] = scalar[i * m + j] } }
                #expect(got == want && got == scalar, "m \(m) rows \(rows) cols \(cols) below \(below)")
            }
        }
    }

    /// out_q += Σ_o T[o, q] G[q, o] against float64, for position counts and channel counts that
    /// end inside and outside the 8 × 8 blocks, with a leading dimension wider than the channels.
    @Test func diagonalProductMatchesTheFloat64Oracle() {
        var rng = SeededRandom(23)
        for n in [1, 7, 8, 9, 16, 33] {
            for cols in [1, 5, 8, 13, 64, 70] {
                for ld in [cols, cols + 3] {
                    let t = rng.array(cols * n), g = rng.array(n * ld), initial = rng.array(n)
                    var want = [Double](repeating: 0, count: n), bound = [Double](repeating: 0, count: n)
                    for q in 0..<n {
                        want[q] = Double(initial[q])
                        bound[q] = abs(Double(initial[q]))
                        for o in 0..<cols {
                            want[q] += Double(t[o * n + q]) * Double(g[q * ld + o])
                            bound[q] += abs(Double(t[o * n + q]) * Double(g[q * ld + o]))
                        }
                    }
                    var got = initial, portable = initial
                    t.withUnsafeBufferPointer { tp in
                        g.withUnsafeBufferPointer { gp in
                            got.withUnsafeMutableBufferPointer {
                                Reduce.diagonalProduct(t: tp.baseAddress!, n: n, g: gp.baseAddress!, ld: ld, cols: cols, into: $0.baseAddress!)
                            }
                            portable.withUnsafeMutableBufferPointer {
                                Reduce.portableDiagonalProduct(
                                    t: tp.baseAddress!, n: n, g: gp.baseAddress!, ld: ld, cols: cols, into: $0.baseAddress!)
                            }
                        }
                    }
                    // float32 accumulation of cols + 1 terms: |error| ≤ (cols + 1) ε Σ|terms|.
                    let eps = Double(Float.ulpOfOne)
                    for q in 0..<n {
                        let tolerance = Double(cols + 1) * eps * bound[q]
                        #expect(abs(Double(got[q]) - want[q]) <= tolerance, "n \(n) cols \(cols) ld \(ld) q \(q)")
                        #expect(abs(Double(portable[q]) - want[q]) <= tolerance, "n \(n) cols \(cols) ld \(ld) q \(q)")
                    }
                }
            }
        }
    }

    /// The gradients scaled per sample (w_q = Float(αs · x_{q / positions}), one rounding each) and
    /// their column sums in order of q: the kernel gives the bits of the scalar expressions and of
    /// the portable loops, for column counts in and out of the 8- and 16-float blocks, several
    /// positions per sample, a row stride wider than the columns, and no sums.
    @Test func scaledRowsAreTheScalarExpressions() {
        var rng = SeededRandom(24)
        for positions in [1, 3] {
            for samples in [1, 2, 5] {
                for cols in [1, 7, 8, 15, 16, 17, 40] {
                    for (ldg, withSums) in [(cols, true), (cols + 5, true), (cols + 2, false)] {
                        let rows = samples * positions
                        let g = rng.array(rows * ldg), x = rng.array(samples).map { Double($0) * 3.7 }
                        let alphaS = -1.0 / 0.3
                        var want = [Float](repeating: 0, count: rows * cols), wantSums = [Float](repeating: 0, count: cols)
                        for q in 0..<rows {
                            let w = Float(alphaS * x[q / positions])
                            for c in 0..<cols {
                                want[q * cols + c] = w * g[q * ldg + c]
                                wantSums[c] = q == 0 ? want[c] : wantSums[c] + want[q * cols + c]
                            }
                        }
                        var out = [Float](repeating: .nan, count: rows * cols), sums = [Float](repeating: .nan, count: cols)
                        var outP = out, sumsP = sums
                        g.withUnsafeBufferPointer { gp in
                            x.withUnsafeBufferPointer { xp in
                                out.withUnsafeMutableBufferPointer { o in
                                    sums.withUnsafeMutableBufferPointer { sp in
                                        Reduce.scaledRows(rows, cols: cols, g: gp.baseAddress!, ldg: ldg, x: xp.baseAddress!, alphaS: alphaS,
                                                          positions: positions, into: o.baseAddress!, sums: withSums ? sp.baseAddress! : nil)
                                    }
                                }
                                outP.withUnsafeMutableBufferPointer { o in
                                    sumsP.withUnsafeMutableBufferPointer { sp in
                                        Reduce.portableScaledRows(
                                            rows, cols: cols, g: gp.baseAddress!, ldg: ldg, x: xp.baseAddress!, alphaS: alphaS,
                                            positions: positions, into: o.baseAddress!, sums: withSums ? sp.baseAddress! : nil)
                                    }
                                }
                            }
                        }
                        let label = "positions \(positions) samples \(samples) cols \(cols) ldg \(ldg) sums \(withSums)"
                        #expect(out == want && outP == want, "\(label)")
                        if withSums {
                            #expect(sums == wantSums && sumsP == wantSums, "\(label)")
                        } else {
                            #expect(sums.allSatisfy { $0.isNaN } && sumsP.allSatisfy { $0.isNaN }, "\(label): sums untouched")
                        }
                    }
                }
            }
        }
    }
}
