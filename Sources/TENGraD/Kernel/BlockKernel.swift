/// The mathematics of an exact Fisher block, written once for every layer kind
/// (docs/DESIGN.md §2–§4). A layer is seen as patches × positions (`BlockGeometry`); with
/// Ĩ_iγ (P × L) and G_iγ (C_g × L) per sample i and group γ:
///
///     u_i       = s (G_iγ Ĩ_iγᵀ)_γ  (bias: Σ_l G_iγ[:, l])
///     K_ij      = s² Σ_γ Σ_{l,p} (Ĩ_iγ[:,l]·Ĩ_jγ[:,p] + 1) (G_iγ[:,l]·G_jγ[:,p])    factored Gram
///     K         = U Uᵀ (rows u_i formed)                                             explicit Gram
///     (Uᵀv)_i   = s Σ_γ ⟨G_iγ, V_γ Ĩ_iγ + b_γ 1ᵀ⟩
///     U x       = s Σ_i x_i u_i :  W_γ = Σ_i x_i G_iγ Ĩ_iγᵀ,  b_γ = Σ_i x_i G_iγ 1
///
/// Everything works on sample chunks whose sizes come from a plan made before the call writes
/// anything; the scratch memory is passed in. No state is kept between calls.
struct BlockKernel {
    let geometry: any BlockGeometry
    let dims: BlockDims
    /// The geometry when its rows are sparse: its gathers and scatters replace the patch products.
    let sparse: (any SparseRowGeometry)?

    init(_ geometry: any BlockGeometry) {
        self.geometry = geometry
        dims = geometry.dims
        sparse = geometry as? any SparseRowGeometry
    }

    // MARK: - Views and scratch sizes

    /// Floats to stack the output gradients of `count` samples of one group (0 when a view does).
    func gradientScratch(samples count: Int) -> Int {
        dims.positionMajor || count == 1 ? 0 : dims.groupOut * dims.positions * count
    }

    /// The output gradients (C_g × count·L) of samples `start..<start+count`, group `group`: a view
    /// when position-major or a single sample, else stacked into `scratch`.
    func gradients(
        _ g: UnsafePointer<Float>, start: Int, count: Int, group: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Block {
        let L = dims.positions, Cg = dims.groupOut
        if dims.positionMajor {
            return Block(base: g + start * dims.outputSize + group * Cg, ld: dims.outChannels, positionMajor: true)
        }
        let first = g + start * dims.outputSize + group * Cg * L
        if count == 1 { return Block(base: first, ld: L, positionMajor: false) }
        let ld = count * L
        for li in 0..<count {
            let src = first + li * dims.outputSize
            for o in 0..<Cg { (scratch + o * ld + li * L).update(from: src + o * L, count: L) }
        }
        return Block(base: scratch, ld: ld, positionMajor: false)
    }

    // MARK: - Products over features and positions (the BLAS calls, for either layout)

    /// C[rows × cols] = Σ_f x(f, r) · y(f, c) over `features` features (pairwise position products).
    private func productOverFeatures(
        _ x: Block, _ y: Block, rows: Int, cols: Int, features: Int, into c: UnsafeMutablePointer<Float>
    ) {
        BLAS.sgemm(
            transA: !x.positionMajor, transB: y.positionMajor, m: rows, n: cols, k: features,
            alpha: 1, a: x.base, lda: x.ld, b: y.base, ldb: y.ld, beta: 0, c: c, ldc: cols)
    }

    /// Lower triangle of C[n × n] = Σ_f x(f, r) · x(f, c).
    private func gramOverFeatures(_ x: Block, n: Int, features: Int, into c: UnsafeMutablePointer<Float>) {
        BLAS.syrkLower(trans: !x.positionMajor, n: n, k: features, a: x.base, lda: x.ld, c: c, ldc: n)
    }

    /// C[rows × cols] = β C + Σ_q x(r, q) · y(c, q) over `count` positions (x has `rows` features,
    /// y has `cols`): a gradient block times a patch block's transpose.
    private func productOverPositions(
        _ x: Block, _ y: Block, rows: Int, cols: Int, count: Int, beta: Float,
        into c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        BLAS.sgemm(
            transA: x.positionMajor, transB: !y.positionMajor, m: rows, n: cols, k: count,
            alpha: 1, a: x.base, lda: x.ld, b: y.base, ldb: y.ld, beta: beta, c: c, ldc: ldc)
    }

    // MARK: - Gram: factored

    /// Samples per block of the factored Gram within `available` floats (at least 1).
    func factoredChunk(m: Int, available: Int) -> Int {
        let L = dims.positions
        let perSample = 2 * (geometry.patchScratch(samples: 1) + dims.groupOut * L)
        var c = max(1, min(m, (available / 2).squareRootFloor / max(1, L)))
        while c > 1 && c * perSample + 2 * (c * L) * (c * L) > available { c -= 1 }
        return c
    }

    /// Floats of workspace the factored Gram needs with blocks of `c` samples.
    func factoredWorkspace(chunk c: Int, m: Int) throws(TENGraDError) -> Int {
        if let sparse { return try sparse.sparseGramScratch(samples: m) }
        let cl = try checkedProduct(c, dims.positions, what: "block positions")
        let blocks = try checkedProduct(2, try checkedSum(geometry.patchScratch(samples: c), gradientScratch(samples: c), what: "workspace"), what: "workspace")
        return try checkedSum(blocks, try checkedProduct(2, cl, cl, what: "workspace"), what: "workspace")
    }

    /// K += Σ_γ Σ_{l,p} (M_I + bias) ∘ M_G over sample blocks I ≤ J, with M_I = Ĩ_Iᵀ Ĩ_J and
    /// M_G = G_Iᵀ G_J the pairwise position products (syrk on diagonal blocks). Unscaled (no s²).
    /// For a linear layer (L = 1, one block) this is K = (AAᵀ + 1) ∘ (GGᵀ). Returns the flops.
    func factoredGram(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into k: UnsafeMutablePointer<Double>,
        chunk c: Int, work: UnsafeMutablePointer<Float>
    ) -> Double {
        if let sparse { return sparse.sparseGram(m: m, a: a, g: g, into: k, work: work) }
        let L = dims.positions, P = dims.patch, Cg = dims.groupOut
        let one: Float = dims.hasBias ? 1 : 0
        let cl = c * L
        let pS = geometry.patchScratch(samples: c), gS = gradientScratch(samples: c)
        let pIbuf = work, pJbuf = pIbuf + pS, gIbuf = pJbuf + pS, gJbuf = gIbuf + gS
        let mI = gJbuf + gS, mG = mI + cl * cl
        var flops = 0.0
        for group in 0..<dims.groups {
            var i0 = 0
            while i0 < m {
                let ci = min(c, m - i0)
                let pI = geometry.patches(a, start: i0, count: ci, group: group, scratch: pIbuf)
                let gI = gradients(g, start: i0, count: ci, group: group, scratch: gIbuf)
                let rows = ci * L
                // Diagonal block: syrk, lower triangle; sub-blocks li > lj are complete, li == lj
                // are symmetric (sum = diagonal + 2 × strict lower).
                gramOverFeatures(pI, n: rows, features: P, into: mI)
                gramOverFeatures(gI, n: rows, features: Cg, into: mG)
                for li in 0..<ci {
                    for lj in 0...li {
                        var sum = 0.0
                        for l in 0..<L {
                            let row = (li * L + l) * rows + lj * L
                            if li != lj {
                                sum += Double(Reduce.shiftedDot(mI + row, plus: one, mG + row, L))
                            } else {
                                let strict = Reduce.shiftedDot(mI + row, plus: one, mG + row, l)
                                sum += 2 * Double(strict) + Double((mI[row + l] + one) * mG[row + l])
                            }
                        }
                        let i = i0 + li, j = i0 + lj
                        k[i * m + j] += sum
                        if i != j { k[j * m + i] += sum }
                    }
                }
                flops += Double(rows) * Double(rows + 1) * Double(P + Cg) + 2 * Double(rows) * Double(rows)
                var j0 = i0 + ci
                while j0 < m {
                    let cj = min(c, m - j0)
                    let pJ = geometry.patches(a, start: j0, count: cj, group: group, scratch: pJbuf)
                    let gJ = gradients(g, start: j0, count: cj, group: group, scratch: gJbuf)
                    let cols = cj * L
                    productOverFeatures(pI, pJ, rows: rows, cols: cols, features: P, into: mI)
                    productOverFeatures(gI, gJ, rows: rows, cols: cols, features: Cg, into: mG)
                    for li in 0..<ci {
                        for lj in 0..<cj {
                            var sum = 0.0
                            for l in 0..<L {
                                let row = (li * L + l) * cols + lj * L
                                sum += Double(Reduce.shiftedDot(mI + row, plus: one, mG + row, L))
                            }
                            let i = i0 + li, j = j0 + lj
                            k[i * m + j] += sum
                            k[j * m + i] += sum
                        }
                    }
                    flops += 2 * Double(rows) * Double(cols) * Double(P + Cg + 1)
                    j0 += cj
                }
                i0 += ci
            }
        }
        return flops
    }

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

    /// All of U (m × d) into `u`, `chunk` samples at a time. Returns the flops.
    func formAllGradients(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into u: UnsafeMutablePointer<Float>,
        chunk c: Int, work: UnsafeMutablePointer<Float>
    ) -> Double {
        var flops = 0.0
        var i0 = 0
        while i0 < m {
            let cc = min(c, m - i0)
            flops += formGradients(m: m, a: a, g: g, start: i0, count: cc, into: u, work: work)
            i0 += cc
        }
        return flops
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
        let mc = chunk(m, fixed: mm + m * width, perSample: patchOne, available: room)
        return ExplicitPlan(channels: cb, chunk: mc, whole: whole, floats: mm + m * width + geometry.formScratch(samples: mc))
    }

    /// Runs an `ExplicitPlan`: adds the Gram to `k` (unscaled). Returns the flops and, when U was
    /// formed whole, its rows ([weight | bias], stride d) inside `work`.
    func explicitGram(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into k: UnsafeMutablePointer<Double>,
        plan: ExplicitPlan, work: UnsafeMutablePointer<Float>
    ) -> (flops: Double, u: UnsafePointer<Float>?) {
        let pT = dims.patchWithBias, P = dims.patch, Cg = dims.groupOut, mm = m * m
        let kf = work, u = work + mm
        if plan.whole {
            let patchBuf = u + m * dims.parameters
            var flops = formAllGradients(m: m, a: a, g: g, into: u, chunk: plan.chunk, work: patchBuf)
            flops += accumulateGram(m: m, u: u, width: dims.parameters, ldu: dims.parameters, into: k, scratch: kf)
            return (flops, UnsafePointer(u))
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
                flops += accumulateGram(m: m, u: u, width: n * pT, ldu: width, into: k, scratch: kf)
                o0 += n
            }
        }
        return (flops, nil)
    }

    // MARK: - Uᵀv and U x from the raw batch

    /// Samples per chunk of `project` / `apply` within `available` floats, and the floats it needs.
    func updatePlan(m: Int, available: Int) throws(TENGraDError) -> (chunk: Int, floats: Int) {
        if sparse != nil { return (m, 0) }
        let perSample = try checkedSum(
            geometry.patchScratch(samples: 1), try checkedProduct(2, dims.groupOut, dims.positions, what: "chunk workspace"),
            what: "chunk workspace")
        let c = chunk(m, fixed: 0, perSample: perSample, available: available)
        return (c, try checkedProduct(c, perSample, what: "chunk workspace"))
    }

    /// t_i = s Σ_γ ⟨G_iγ, V_γ Ĩ_iγ + b_γ 1ᵀ⟩ over sample chunks (one GEMM per chunk and group).
    /// When the whole batch is one chunk of one group, its patch matrix is returned (a view into
    /// `work` or the activations) so the `apply` that follows need not unfold again.
    func project(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Double,
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        into t: UnsafeMutablePointer<Double>, chunk c: Int, work: UnsafeMutablePointer<Float>
    ) -> (flops: Double, patches: Block?) {
        if let sparse { return (sparse.sparseProject(m: m, a: a, g: g, scale: s, weightGrad: weightGrad, into: t), nil) }
        let L = dims.positions, P = dims.patch, Cg = dims.groupOut
        let patchBuf = work, tBuf = patchBuf + geometry.patchScratch(samples: c), gBuf = tBuf + Cg * c * L
        for i in 0..<m { t[i] = 0 }
        var last: Block?
        var i0 = 0
        while i0 < m {
            let cc = min(c, m - i0)
            let n = cc * L
            for group in 0..<dims.groups {
                let patches = geometry.patches(a, start: i0, count: cc, group: group, scratch: patchBuf)
                last = patches
                let grads = gradients(g, start: i0, count: cc, group: group, scratch: gBuf)
                let v = weightGrad + group * Cg * P
                // T = V_γ Ĩ (Cg × n), channel-major whatever the patches' layout: with n ≪ P this
                // orientation runs 3–15 % faster in OpenBLAS than T's transpose.
                BLAS.sgemm(transA: false, transB: patches.positionMajor, m: Cg, n: n, k: P, alpha: 1, a: v, lda: P,
                           b: patches.base, ldb: patches.ld, beta: 0, c: tBuf, ldc: n)
                let bias = biasGrad.map { $0 + group * Cg }
                if grads.positionMajor {
                    // Per position q: Σ_o T[o, q] G[q, o] (+ the bias part), into `gBuf` (idle:
                    // position-major gradients are a view).
                    let acc = gBuf
                    for q in 0..<n { acc[q] = bias.map { Reduce.dot($0, grads.base + q * grads.ld, Cg) } ?? 0 }
                    Reduce.diagonalProduct(t: tBuf, n: n, g: grads.base, ld: grads.ld, cols: Cg, into: acc)
                    for li in 0..<cc {
                        t[i0 + li] += s * Double(Reduce.sum(acc + li * L, L))
                    }
                } else {
                    for li in 0..<cc {
                        var dot = 0.0
                        for o in 0..<Cg {
                            let trow = tBuf + o * n + li * L, grow = grads.base + o * grads.ld + li * L
                            dot += Double(Reduce.shiftedDot(trow, plus: bias?[o] ?? 0, grow, L))
                        }
                        t[i0 + li] += s * dot
                    }
                }
            }
            i0 += cc
        }
        let flops = 2 * Double(m) * Double(L) * Double(dims.outChannels) * Double(P + 1)
        return (flops, dims.groups == 1 && c >= m ? last : nil)
    }

    /// weight_γ ← β weight_γ + Σ_i w_i G_iγ Ĩ_iγᵀ and bias_γ ← β bias_γ + Σ_i w_i G_iγ 1, with
    /// w_i = α s x_i (one GEMM per chunk and group). `kept`: the patch matrix of the whole batch
    /// (one group) that `project` returned, still in `work`. Returns the flops.
    func apply(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Double,
        x: UnsafePointer<Double>, alpha: Double, beta: Float,
        weight: UnsafeMutablePointer<Float>, bias: UnsafeMutablePointer<Float>?,
        chunk c: Int, work: UnsafeMutablePointer<Float>, kept: Block? = nil
    ) -> Double {
        if let sparse { return sparse.sparseApply(m: m, a: a, g: g, scale: s, x: x, alpha: alpha, beta: beta, weight: weight) }
        let L = dims.positions, P = dims.patch, Cg = dims.groupOut, Cout = dims.outChannels
        let patchBuf = work, gs = patchBuf + geometry.patchScratch(samples: c)
        var i0 = 0
        while i0 < m {
            let cc = min(c, m - i0)
            let n = cc * L
            let firstBeta: Float = i0 == 0 ? beta : 1
            for group in 0..<dims.groups {
                let patches = kept ?? geometry.patches(a, start: i0, count: cc, group: group, scratch: patchBuf)
                // GS = the chunk's gradients scaled per sample, stored in the patches' layout.
                for li in 0..<cc {
                    let w = Float(alpha * s * x[i0 + li])
                    let src = g + (i0 + li) * dims.outputSize
                    if dims.positionMajor {
                        for l in 0..<L {
                            let from = src + l * Cout + group * Cg, to = gs + (li * L + l) * Cg
                            for o in 0..<Cg { to[o] = w * from[o] }
                        }
                    } else {
                        for o in 0..<Cg {
                            let from = src + (group * Cg + o) * L, to = gs + o * n + li * L
                            for l in 0..<L { to[l] = w * from[l] }
                        }
                    }
                }
                let scaled = Block(base: gs, ld: dims.positionMajor ? Cg : n, positionMajor: dims.positionMajor)
                productOverPositions(
                    scaled, patches, rows: Cg, cols: P, count: n, beta: firstBeta, into: weight + group * Cg * P, ldc: P)
                if let bias {
                    // Position-major: the column sums over contiguous rows into the idle half of
                    // the workspace after GS, in the order of a strided walk (the same bits).
                    let sums = gs + Cg * n
                    if dims.positionMajor {
                        sums.update(from: gs, count: Cg)
                        for q in 1..<max(n, 1) { Reduce.accumulate(gs + q * Cg, into: sums, Cg) }
                    }
                    for o in 0..<Cg {
                        let sum = dims.positionMajor ? sums[o] : Reduce.sum(gs + o * n, n)
                        let j = group * Cg + o
                        bias[j] = (firstBeta == 0 ? 0 : firstBeta * bias[j]) + sum
                    }
                }
            }
            i0 += cc
        }
        return 2 * Double(m) * Double(L) * Double(Cout) * Double(P + 1)
    }

    // MARK: - Uᵀv and U x from kept per-sample gradients

    /// t_i = s (U_w v_w + U_b v_b)_i: one GEMV over the kept U (rows [weight | bias]); `tf` holds m
    /// floats. Returns the flops.
    func projectKept(
        m: Int, u: UnsafePointer<Float>, scale s: Double, weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        into t: UnsafeMutablePointer<Double>, tf: UnsafeMutablePointer<Float>
    ) -> Double {
        let d = dims.parameters
        BLAS.sgemv(trans: false, m: m, n: dims.weightCount, alpha: 1, a: u, lda: d, x: weightGrad, beta: 0, y: tf)
        if let biasGrad {
            BLAS.sgemv(trans: false, m: m, n: dims.biasCount, alpha: 1, a: u + dims.weightCount, lda: d, x: biasGrad, beta: 1, y: tf)
        }
        for i in 0..<m { t[i] = s * Double(tf[i]) }
        return 2 * Double(m) * Double(d)
    }

    /// weight ← β weight + α s U_wᵀ x, bias likewise: one GEMV over U (rows [weight | bias], row
    /// stride d). `xf` holds m floats. Returns the flops.
    func applyKept(
        m: Int, u: UnsafePointer<Float>, scale s: Double, x: UnsafePointer<Double>, alpha: Double, beta: Float,
        weight: UnsafeMutablePointer<Float>, bias: UnsafeMutablePointer<Float>?, xf: UnsafeMutablePointer<Float>
    ) -> Double {
        let d = dims.parameters
        for i in 0..<m { xf[i] = Float(alpha * s * x[i]) }
        BLAS.sgemv(trans: true, m: m, n: dims.weightCount, alpha: 1, a: u, lda: d, x: xf, beta: beta, y: weight)
        if let bias {
            BLAS.sgemv(trans: true, m: m, n: dims.biasCount, alpha: 1, a: u + dims.weightCount, lda: d, x: xf, beta: beta, y: bias)
        }
        return 2 * Double(m) * Double(d)
    }

    // MARK: - Helpers

    /// Largest chunk c ≤ m with fixed + c·perSample ≤ available (at least 1).
    func chunk(_ m: Int, fixed: Int, perSample: Int, available: Int) -> Int {
        guard perSample > 0 else { return m }
        return max(1, min(m, (available - fixed) / perSample))
    }
}

extension Int {
    /// ⌊√self⌋ for non-negative values.
    var squareRootFloor: Int {
        guard self > 0 else { return 0 }
        var r = Int(Double(self).squareRoot())
        while r * r > self { r -= 1 }
        while (r + 1) * (r + 1) <= self { r += 1 }
        return r
    }
}
