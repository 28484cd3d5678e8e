// Part of `BlockKernel` (BlockKernel.swift): per-sample gradients formed group by group or as
// whole rows, and the explicit Gram from them.
extension BlockKernel {
    // MARK: - Per-sample gradients (explicit Gram, kept U)

    /// Writes the unscaled per-sample gradients of samples `start..<start+count`, output features
    /// `o0..<o0+n` of group `group`: row i gets the weight part (n × P, row-major) at
    /// `row + weightColumn` and, with a bias, the n bias entries at `row + biasColumn`.
    /// `patchBuf` holds `formScratch(count)` floats. Returns the flops.
    func formGradients(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int, group: Int, o0: Int, n: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int, weightColumn: Int, biasColumn: Int,
        patchBuf: UnsafeMutablePointer<Float>
    ) -> Double {
        let L = dims.positions, P = dims.patch
        if !geometry.formWeightGradients(
            a: a, g: g, start: start, count: count, group: group, o0: o0, n: n, into: u, ldu: ldu, column: weightColumn,
            scratch: patchBuf) {
            let patches = geometry.patches(a, start: start, count: count, group: group, scratch: patchBuf)
            // One product per sample, G_i Ĩ_iᵀ, as one batched call: the samples' gradient views
            // are outputSize apart in the caller's array, their patch views L positions apart.
            let g0 = gradients(g, start: start, count: 1, group: group, scratch: patchBuf).from(feature: o0)
            let p0 = patches.from(position: 0)
            BLAS.sgemmBatch(
                transA: g0.positionMajor, transB: !p0.positionMajor, m: n, n: P, k: L,
                a: g0.base, lda: g0.ld, strideA: dims.outputSize,
                b: p0.base, ldb: p0.ld, strideB: patches.from(position: L).base - p0.base,
                c: u + start * ldu + weightColumn, ldc: P, strideC: ldu, count: count)
        }
        if dims.hasBias {
            for li in 0..<count {
                let i = start + li
                let gi = gradients(g, start: i, count: 1, group: group, scratch: patchBuf).from(feature: o0)
                let row = u + i * ldu
                for o in 0..<n {
                    row[biasColumn + o] = gi.positionMajor
                        ? Reduce.stridedSum(gi.base + o, stride: gi.ld, L) : Reduce.sum(gi.base + o * gi.ld, L)
                }
            }
        }
        return 2 * Double(count) * Double(n) * Double(L) * Double(dims.patchWithBias)
    }

    /// Samples per chunk when forming per-sample gradients: their inputs, output gradients and
    /// patches within about 1 MiB (so they are still in cache when the GEMMs read them after the
    /// NaN scan), and the patches within `available` floats.
    func formChunk(m: Int, available: Int) -> Int {
        let scratch = geometry.formScratch(samples: 1)
        let fits = chunk(m, fixed: 0, perSample: scratch, available: available)
        let cached = chunk(m, fixed: 0, perSample: scratch + dims.inputSize + dims.outputSize, available: (1 << 20) / 4)
        return min(fits, max(cached, geometry.formChunkFloor))
    }

    /// Rows `start..<start+count` of U (m × d, rows [weight | bias], unscaled) into `u`, every
    /// group, unfolding in `work` (`formScratch(count)` floats). Returns the flops.
    func formGradients(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int,
        into u: UnsafeMutablePointer<Float>, work: UnsafeMutablePointer<Float>
    ) -> Double {
        if geometry.formRows(a: a, g: g, start: start, count: count, into: u, ldu: dims.parameters) {
            return 2 * Double(count) * Double(dims.positions) * Double(dims.outChannels) * Double(dims.patchWithBias)
        }
        var flops = 0.0
        for group in 0..<dims.groups {
            flops += formGradients(
                a: a, g: g, start: start, count: count, group: group, o0: 0, n: dims.groupOut, into: u, ldu: dims.parameters,
                weightColumn: group * dims.groupOut * dims.patch, biasColumn: dims.weightCount + group * dims.groupOut,
                patchBuf: work)
        }
        return flops
    }

    /// How `formAllGradients` runs within `available` floats of scratch: its chunk (`formChunk`),
    /// whether on two threads of our own (BLAS may use two, there are at least two chunks, and
    /// two scratches fit: docs/DESIGN.md §8), and the scratch floats that takes.
    func formPlan(m: Int, available: Int) -> (chunk: Int, twoThreads: Bool, floats: Int) {
        let chunk = formChunk(m: m, available: available), one = geometry.formScratch(samples: chunk)
        let two = BLAS.threads >= 2 && m >= 2 * chunk && 2 * one <= available
        return (chunk, two, two ? 2 * one : one)
    }

    /// All of U (m × d) into `u`, `chunk` samples at a time, each chunk after `check(start, count)`
    /// (an input scan, so the products read the inputs while in cache), `work` holding one scratch
    /// of `formScratch(chunk)` floats per thread. Returns the flops.
    ///
    /// `twoThreads`: two threads of our own each form a half of the samples (whole chunks, so
    /// every sample is formed by the same calls as on one thread: the same bits) with OpenBLAS on
    /// one thread per call — the scans and copies around the products then run on both cores,
    /// not on one while OpenBLAS's other worker waits. A failure in either half is thrown after
    /// both finished: the first half's when both failed, as the one-thread loop would.
    func formAllGradients<E: Error>(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into u: UnsafeMutablePointer<Float>,
        chunk c: Int, work: UnsafeMutablePointer<Float>, twoThreads: Bool = false,
        check: (Int, Int) throws(E) -> Void
    ) throws(E) -> Double {
        func form(_ samples: Range<Int>, _ work: UnsafeMutablePointer<Float>) throws(E) -> Double {
            var flops = 0.0
            var i0 = samples.lowerBound
            while i0 < samples.upperBound {
                let cc = min(c, samples.upperBound - i0)
                try check(i0, cc)
                flops += formGradients(m: m, a: a, g: g, start: i0, count: cc, into: u, work: work)
                i0 += cc
            }
            return flops
        }
        guard twoThreads else { return try form(0..<m, work) }
        let half = (m / c + 1) / 2 * c, scratch = geometry.formScratch(samples: c)
        var flops = [0.0, 0.0]
        var errors: [E?] = [nil, nil]
        flops.withUnsafeMutableBufferPointer { flops in
            errors.withUnsafeMutableBufferPointer { errors in
                BLAS.withThreads(1) {
                    onTwoThreads { part in
                        do throws(E) {
                            flops[part] = try form(part == 0 ? 0..<half : half..<m, work + part * scratch)
                        } catch {
                            errors[part] = error
                        }
                    }
                }
            }
        }
        if let error = errors[0] ?? errors[1] { throw error }
        return flops[0] + flops[1]
    }

    /// K += lower-and-upper of Σ rows: K_ij += u_i·u_j for U (m × width, row stride ldu), via one
    /// float32 syrk into `scratch` (m² floats) accumulated in float64. Returns the flops.
    func accumulateGram(
        m: Int, u: UnsafePointer<Float>, width: Int, ldu: Int, into k: UnsafeMutablePointer<Double>,
        scratch: UnsafeMutablePointer<Float>
    ) -> Double {
        BLAS.syrkLower(trans: false, n: m, k: width, a: u, lda: ldu, c: scratch, ldc: m)
        for i in 0..<m {
            for j in 0...i {
                let v = Double(scratch[i * m + j])
                k[i * m + j] += v
                if i != j { k[j * m + i] += v }
            }
        }
        return Double(m) * Double(m + 1) * Double(width)
    }

    /// K += (U E^{-1/2})(U E^{-1/2})ᵀ for kept U (m × d, rows [weight | bias]) and a diagonal
    /// base: column blocks of U scaled into `work` (`scaledGramFloats` floats: the syrk's m² and
    /// the block), one syrk each. Returns the flops.
    func scaledGram(
        m: Int, u: UnsafePointer<Float>, base: DiagonalBase, into k: UnsafeMutablePointer<Double>,
        work: UnsafeMutablePointer<Float>, floats: Int
    ) -> Double {
        let d = dims.parameters
        let width = max(1, min(d, (floats - m * m) / max(m, 1)))
        let block = work + m * m
        var flops = 0.0
        var c0 = 0
        while c0 < d {
            let w = min(width, d - c0)
            for i in 0..<m { (block + i * w).update(from: u + i * d + c0, count: w) }
            base.scaleRows(block, rows: m, width: w, ldu: w, column: c0)
            flops += accumulateGram(m: m, u: block, width: w, ldu: w, into: k, scratch: work)
            c0 += w
        }
        return flops
    }

    /// Floats `scaledGram` takes within `available`: m² and a block of at least 1024 columns.
    func scaledGramFloats(m: Int, available: Int) throws(TENGraDError) -> Int {
        let mm = try checkedProduct(m, m, what: "batch²")
        let least = try checkedSum(mm, try checkedProduct(m, min(dims.parameters, 1024), what: "Gram block"), what: "workspace")
        let whole = try checkedSum(mm, try checkedProduct(m, dims.parameters, what: "Gram block"), what: "workspace")
        return min(whole, max(least, available))
    }

    /// Explicit Gram without keeping U: per-sample gradients of a block of output features for
    /// all m samples, then K += U_blk U_blkᵀ. When all of U fits `available` floats it is formed
    /// whole and returned (a pointer into `work`, valid until the workspace is next requested),
    /// so the one-call update can use it.
    struct ExplicitPlan {
        /// Output features per block (C_g when U is formed whole).
        let channels: Int
        /// Samples unfolded at a time.
        let chunk: Int
        let whole: Bool
        /// U formed whole on two threads of our own (`formAllGradients`): `floats` holds two scratches.
        let twoThreads: Bool
        let floats: Int
    }

    func explicitPlan(m: Int, available: Int) throws(TENGraDError) -> ExplicitPlan {
        let pT = dims.patchWithBias, d = dims.parameters, mm = m * m
        let patchOne = geometry.formScratch(samples: 1)
        let minimum = try checkedSum(
            try checkedSum(mm, try checkedProduct(m, pT, what: "batch × patch"), what: "workspace"), patchOne, what: "workspace")
        let room = max(available, minimum)
        let whole = (room - mm - patchOne) / m >= d  // all of U fits (m·d cannot overflow then)
        let cb = whole ? dims.groupOut : max(1, min(dims.groupOut, (room - mm - patchOne) / max(1, m * pT)))
        let width = whole ? d : cb * pT
        // The per-sample snapshot's chunks (within about 1 MiB, in cache after the copies); two
        // threads only for a whole U (the blocks' loop forms a block of channels at a time).
        let form = formPlan(m: m, available: room - mm - m * width)
        let two = whole && form.twoThreads
        return ExplicitPlan(
            channels: cb, chunk: form.chunk, whole: whole, twoThreads: two,
            floats: mm + m * width + (two ? form.floats : geometry.formScratch(samples: form.chunk)))
    }

    /// Runs an `ExplicitPlan`: adds the Gram to `k` (unscaled; with a base, of U E^{-1/2}).
    /// Returns the flops and, when U was formed whole without a base, its rows ([weight | bias],
    /// stride d) inside `work`.
    func explicitGram(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into k: UnsafeMutablePointer<Double>,
        plan: ExplicitPlan, work: UnsafeMutablePointer<Float>, base: DiagonalBase? = nil
    ) -> (flops: Double, u: UnsafePointer<Float>?) {
        let pT = dims.patchWithBias, P = dims.patch, Cg = dims.groupOut, mm = m * m
        let kf = work, u = work + mm
        if plan.whole {
            let patchBuf = u + m * dims.parameters
            var flops = formAllGradients(
                m: m, a: a, g: g, into: u, chunk: plan.chunk, work: patchBuf, twoThreads: plan.twoThreads) { _, _ in }
            base?.scaleRows(u, rows: m, width: dims.parameters, ldu: dims.parameters, column: 0)
            flops += accumulateGram(m: m, u: u, width: dims.parameters, ldu: dims.parameters, into: k, scratch: kf)
            return (flops, base == nil ? UnsafePointer(u) : nil)
        }
        let width = plan.channels * pT
        let patchBuf = u + m * width
        var flops = 0.0
        for group in 0..<dims.groups {
            var o0 = 0
            while o0 < Cg {
                let n = min(plan.channels, Cg - o0)
                var i0 = 0
                while i0 < m {
                    let c = min(plan.chunk, m - i0)
                    flops += formGradients(
                        a: a, g: g, start: i0, count: c, group: group, o0: o0, n: n, into: u, ldu: width,
                        weightColumn: 0, biasColumn: n * P, patchBuf: patchBuf)
                    i0 += c
                }
                if let base {
                    geometry.scaleWeightBlock(u, rows: m, ldu: width, group: group, o0: o0, n: n, base: base)
                    if dims.hasBias {
                        base.scaleRows(u + n * P, rows: m, width: n, ldu: width, column: dims.weightCount + group * Cg + o0)
                    }
                }
                flops += accumulateGram(m: m, u: u, width: n * pT, ldu: width, into: k, scratch: kf)
                o0 += n
            }
        }
        return (flops, nil)
    }
}
