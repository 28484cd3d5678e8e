import CKernels
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
///
/// This file: views, the BLAS products for either layout, the factored Gram. The per-sample
/// gradients and the explicit Gram: BlockKernel+Gradients.swift; Uᵀv and U x over the raw batch
/// or kept U: BlockKernel+Products.swift.
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
    func productOverFeatures(
        _ x: Block, _ y: Block, rows: Int, cols: Int, features: Int, into c: UnsafeMutablePointer<Float>
    ) {
        BLAS.sgemm(
            transA: !x.positionMajor, transB: y.positionMajor, m: rows, n: cols, k: features,
            alpha: 1, a: x.base, lda: x.ld, b: y.base, ldb: y.ld, beta: 0, c: c, ldc: cols)
    }

    /// Lower triangle of C[n × n] = Σ_f x(f, r) · x(f, c).
    func gramOverFeatures(_ x: Block, n: Int, features: Int, into c: UnsafeMutablePointer<Float>) {
        BLAS.syrkLower(trans: !x.positionMajor, n: n, k: features, a: x.base, lda: x.ld, c: c, ldc: n)
    }

    /// C[rows × cols] = β C + Σ_q x(r, q) · y(c, q) over `count` positions (x has `rows` features,
    /// y has `cols`): a gradient block times a patch block's transpose.
    func productOverPositions(
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
        chunk c: Int, work: UnsafeMutablePointer<Float>, base: DiagonalBase? = nil
    ) -> Double {
        if let sparse { return sparse.sparseGram(m: m, a: a, g: g, into: k, work: work, base: base) }
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
                if L == 1 {
                    BlockKernel.addSinglePositionProducts(
                        mI: mI, mG: mG, rows: ci, cols: ci, diagonal: true, one: one, at: (i0, i0), into: k, m: m)
                } else {
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
                    if L == 1 {
                        BlockKernel.addSinglePositionProducts(
                            mI: mI, mG: mG, rows: ci, cols: cj, diagonal: false, one: one, at: (i0, j0), into: k, m: m)
                    } else {
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
                    }
                    flops += 2 * Double(rows) * Double(cols) * Double(P + Cg + 1)
                    j0 += cj
                }
                i0 += ci
            }
        }
        return flops
    }

    /// K += (M_I + one) ∘ M_G for one position per sample (linear layers), M row-major with `cols`
    /// per row, for samples i0 + li and j0 + lj: the lower triangle when `diagonal` (an I = J
    /// block, M_I and M_G lower triangles from syrk), else every pair; then mirrored. The same
    /// float operations as the general loop at L = 1 — fl(x y) + y off the diagonal, fl(x + one) y
    /// on it — without its per-pair dot products over L positions, which cost more than the pair
    /// (256², m = 512: a fifth of the curvature update in `perf`).
    private static func addSinglePositionProducts(
        mI: UnsafePointer<Float>, mG: UnsafePointer<Float>, rows: Int, cols: Int, diagonal: Bool, one: Float,
        at origin: (i0: Int, j0: Int), into k: UnsafeMutablePointer<Double>, m: Int
    ) {
        for li in 0..<rows {
            let x = mI + li * cols, y = mG + li * cols, kRow = k + (origin.i0 + li) * m + origin.j0
            let end = diagonal ? li : cols
            if one == 0 {
                for lj in 0..<end { kRow[lj] += Double(x[lj] * y[lj]) }
            } else {
                for lj in 0..<end { kRow[lj] += Double(x[lj] * y[lj] + y[lj]) }
            }
            if diagonal { kRow[li] += Double((x[li] + one) * y[li]) }
        }
        mirror(k, m: m, rows: origin.i0..<origin.i0 + rows, cols: origin.j0..<origin.j0 + cols, below: diagonal)
    }

    /// k[j][i] = k[i][j] for i in `rows`, j in `cols` (j < i only when `below`). Exact for K += a
    /// symmetric addition written on one side: K is symmetric before (zero, or earlier groups'
    /// symmetric sums), so both sides hold the same sum. Written entry by entry, the transposed
    /// side took a cache line per entry, all lines of a column in one L1 set at power-of-two m
    /// (256², m = 512: 90 % of the loop's samples on that store). In 8 × 8 tiles it was still 55 %
    /// of them (both sides' rows in one or two sets); with AVX2, 4 × 4 blocks transposed in
    /// registers (`tengrad_k_mirror`), each written line stored once per block.
    static func mirror(_ k: UnsafeMutablePointer<Double>, m: Int, rows: Range<Int>, cols: Range<Int>, below: Bool) {
        if Reduce.wide {
            return tengrad_k_mirror(
                k, Int64(m), Int64(rows.lowerBound), Int64(rows.upperBound), Int64(cols.lowerBound), Int64(cols.upperBound),
                below ? 1 : 0)
        }
        portableMirror(k, m: m, rows: rows, cols: cols, below: below)
    }

    /// `mirror` in portable Swift, in 8 × 8 tiles (CPUs without AVX2; the tests compare the two).
    static func portableMirror(_ k: UnsafeMutablePointer<Double>, m: Int, rows: Range<Int>, cols: Range<Int>, below: Bool) {
        let tile = 8
        for ib in stride(from: rows.lowerBound, to: rows.upperBound, by: tile) {
            let iEnd = min(ib + tile, rows.upperBound)
            for jb in stride(from: cols.lowerBound, to: cols.upperBound, by: tile) {
                if below && jb >= iEnd { break }
                let jEnd = min(jb + tile, cols.upperBound)
                for i in ib..<iEnd {
                    let last = below ? min(jEnd, i) : jEnd
                    var j = jb
                    while j < last {
                        k[j * m + i] = k[i * m + j]
                        j += 1
                    }
                }
            }
        }
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
