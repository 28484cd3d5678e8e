// Part of `BlockKernel` (BlockKernel.swift): the reuse products Uᵀv and U x, over the raw batch
// (patch GEMMs, or a sparse kind's gathers and scatters) or over kept per-sample gradients.
extension BlockKernel {
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
                    // `gBuf` is idle: position-major gradients are a view.
                    BlockKernel.addPositionProducts(
                        t: tBuf, g: grads.base, ld: grads.ld, cols: Cg, bias: bias, samples: cc, positions: L, scale: s,
                        into: t + i0, scratch: gBuf)
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

    /// t_i += s Σ_l Σ_o T[o, (i, l)] G[(i, l), o] (+ the bias part b·G) for `samples` samples of
    /// `positions` positions each: T (cols × n, row stride n) against position-major gradients.
    /// `scratch` holds n floats (the per-position sums).
    static func addPositionProducts(
        t tBuf: UnsafePointer<Float>, g: UnsafePointer<Float>, ld: Int, cols: Int, bias: UnsafePointer<Float>?,
        samples: Int, positions L: Int, scale s: Double, into t: UnsafeMutablePointer<Double>,
        scratch acc: UnsafeMutablePointer<Float>
    ) {
        let n = samples * L
        for q in 0..<n { acc[q] = bias.map { Reduce.dot($0, g + q * ld, cols) } ?? 0 }
        Reduce.diagonalProduct(t: tBuf, n: n, g: g, ld: ld, cols: cols, into: acc)
        for i in 0..<samples { t[i] += s * Double(Reduce.sum(acc + i * L, L)) }
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
                // GS = the chunk's gradients scaled per sample, stored in the patches' layout;
                // position-major, with the bias part's column sums (over contiguous rows, into the
                // idle half of the workspace after GS, in the order of a strided walk: the same bits).
                let sums = gs + Cg * n
                if dims.positionMajor {
                    // Rows of Cg at stride Cout: a sample's L positions, then the next sample's.
                    Reduce.scaledRows(
                        n, cols: Cg, g: g + i0 * dims.outputSize + group * Cg, ldg: Cout, x: x + i0, alphaS: alpha * s,
                        positions: L, into: gs, sums: bias == nil ? nil : sums)
                } else {
                    for li in 0..<cc {
                        let w = Float(alpha * s * x[i0 + li])
                        let src = g + (i0 + li) * dims.outputSize
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
}
