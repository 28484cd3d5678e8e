// Part of `ExactBlock` (ExactBlock.swift: the layer, its settings, snapshots from a batch or rows).
// The precondition of any gradient, with or without a diagonal base (docs/DESIGN.md §2, §15): in
// one call, or in two phases — `preparePrecondition` (everything that can fail: the gradient's
// scan, Uᵀv, the solve, the bounds; records ⟨update, v⟩) and `finishPrecondition` (writes
// ν · update), so that a step over many layers writes nothing until every layer succeeded and
// folds a factor known only then (KL clipping's ν) into the products (docs/DESIGN.md §6).

/// What a precondition's first phase leaves for its second: the solved x = (K + mλI)⁻¹ Uᵀv, where
/// the products read, and the update's a-priori bounds.
struct PreparedUpdate {
    enum Products {
        case kept
        /// The OpenBLAS path over a raw snapshot, in chunks of `chunk` samples (`floats` of workspace).
        case raw(chunk: Int, floats: Int)
        case fused(FusedLinear)
    }

    let snapshot: Snapshot
    let kernel: BlockKernel
    let products: Products
    /// m coefficients: the workspace's within one call, the layer's own (`preparedX`) for two phases.
    let x: UnsafeMutablePointer<Double>
    let damping: Double
    /// Bound on |v − U x| as written before E⁻¹ divides it (with a base; 0 without).
    let intermediateBound: Double
    /// Bound on the update's magnitude (scale 1).
    let bound: Double
    /// ⟨update, v⟩ at scale 1.
    let dotGrad: Double
    let flops: Double
    let seconds: Double
    /// A raw convolution's unfolded patches left in the workspace by Uᵀv (within one call only).
    let patches: Block?
}

extension ExactBlock {
    func precondition(
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext
    ) throws(TENGraDError) {
        let p = try prepareUpdate(weightGrad: weightGrad, biasGrad: biasGrad, context: context, keep: false)
        try finishUpdate(p, weightGrad: weightGrad, biasGrad: biasGrad, scale: 1, weightUpdate: weightUpdate,
                         biasUpdate: biasUpdate, context: context)
    }

    /// The first phase: checks, Uᵀv, x, the bounds and ⟨update, v⟩ (recorded, for KL clipping);
    /// writes no output. Replaces an earlier unfinished first phase of this layer.
    func preparePrecondition(
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?, context: LayerContext
    ) throws(TENGraDError) {
        prepared = try prepareUpdate(weightGrad: weightGrad, biasGrad: biasGrad, context: context, keep: true)
    }

    /// The second phase: `scale` · the update of the gradient the first phase read (the caller
    /// passes the same, unchanged arrays), written to the outputs (which may be them). Fails only
    /// when `scale` makes the update's bound overflow, or without a first phase since the
    /// snapshot last changed.
    func finishPrecondition(
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?, scale: Double,
        weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?, context: LayerContext
    ) throws(TENGraDError) {
        guard let p = prepared else {
            throw TENGraDError(.state, "precondition_finish without a precondition_prepare of this layer since its last "
                               + "precondition_finish or curvature update")
        }
        try finishUpdate(p, weightGrad: weightGrad, biasGrad: biasGrad, scale: scale, weightUpdate: weightUpdate,
                         biasUpdate: biasUpdate, context: context)
        prepared = nil
    }

    private func prepareUpdate(
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?, context: LayerContext, keep: Bool
    ) throws(TENGraDError) -> PreparedUpdate {
        guard let snap = snapshot else {
            throw TENGraDError(.state, "precondition before any curvature update on this layer")
        }
        let start = monotonicSeconds()
        let k = try kernel(tokens: snap.tokens)
        let base = snap.base
        // Linear layers on AVX2 CPUs: kernels of our own validate the gradient in the first product
        // (when their workspace fits; else the OpenBLAS path, which works in chunks).
        var fused: FusedLinear?
        if base == nil, case .raw = snap.data, let f = FusedLinear(kernel: k, m: snap.m),
           f.floats <= workspaceFloats(context, reserve: 0) { fused = f }
        var scanW = fused == nil ? GradientScan(weightGrad, count: dims.weightCount) : .empty
        guard scanW.finite else { throw TENGraDError(.notFinite, "weight_grad contains NaN or Inf") }
        var scanB = GradientScan.empty
        if let biasGrad {
            scanB = GradientScan(biasGrad, count: dims.biasCount)
            guard scanB.finite else { throw TENGraDError(.notFinite, "bias_grad contains NaN or Inf") }
        }
        // A new damping factorizes a new system from the kept Gram; installed only at the end.
        let system = try snap.system.refactored(damping: context.damping * snap.dampingScale, budget: context.budget)
        let m = snap.m, s = Double(snap.scale)
        let t = try context.workspace.doubles(try checkedSum(try checkedProduct(2, m, what: "2·batch"), fused?.doubles ?? 0, what: "workspace"))
        let tCopy = t + m
        // With a base, Uᵀ reads E⁻¹v (d floats after the products' workspace) and E⁻¹ scales v − U x.
        let extra = base == nil ? 0 : dims.parameters
        if let base {
            let largest = max(scanW.maxAbs, scanB.maxAbs) / Double(base.smallest)
            guard largest <= safeMagnitude else {
                throw TENGraDError(.numerical, "gradient / base overflows float32 (bound \(largest))")
            }
        }

        // Everything the products need, allocated before any output is written (the second phase
        // asks the workspace for the same sizes again: it only grows, so they are there).
        let products: PreparedUpdate.Products
        let work: UnsafeMutablePointer<Float>  // the products' floats (the kept path's: 2m scratch)
        let w: UnsafeMutablePointer<Float>  // after the products' workspace: E⁻¹v when there is a base
        switch snap.data {
        case .perSample:
            // The float workspace is idle on this path: no allocation per reuse step.
            work = try context.workspace.floats(try checkedSum(try checkedProduct(2, m, what: "2·batch"), extra, what: "workspace"))
            products = .kept
            w = work + 2 * m
        case .raw:
            if let fused {
                work = try context.workspace.floats(fused.floats)
                products = .fused(fused)
                w = work  // not read: no base on this path
                break
            }
            let plan = try k.updatePlan(m: m, available: workspaceFloats(context, reserve: extra * 4))
            work = try context.workspace.floats(try checkedSum(plan.floats, extra, what: "workspace"))
            products = .raw(chunk: plan.chunk, floats: plan.floats)
            w = work + plan.floats
        }
        // What Uᵀ reads: v, or E⁻¹v (and Σ v²/e for ⟨update, v⟩).
        var vw = weightGrad, vb = biasGrad
        var vNorm = scanW.sumSquares + scanB.sumSquares
        if let base {
            vNorm = base.divide(weightGrad, count: dims.weightCount, column: 0, into: w)
            if let biasGrad { vNorm += base.divide(biasGrad, count: dims.biasCount, column: dims.weightCount, into: w + dims.weightCount) }
            (vw, vb) = (UnsafePointer(w), biasGrad == nil ? nil : UnsafePointer(w + dims.weightCount))
        }

        var flops: Double
        var patches: Block?
        switch (snap.data, products) {
        case let (.perSample(u), _):
            flops = k.projectKept(m: m, u: UnsafePointer(u.base), scale: s, weightGrad: vw, biasGrad: vb, into: t, tf: work)
        case let (.raw(a, g), .fused(f)):
            let sum = f.project(
                v: vw, bias: vb, a: UnsafePointer(a.base), g: UnsafePointer(g.base), scale: s, positions: k.dims.positions,
                into: t, work: work, sums: t + 2 * m)
            scanW = GradientScan(sumOfSquares: sum)
            guard scanW.finite else { throw TENGraDError(.notFinite, "weight_grad contains NaN or Inf") }
            vNorm = scanW.sumSquares + scanB.sumSquares
            flops = 2 * Double(f.n) * Double(f.out) * Double(f.inFeatures + 1)
        case let (.raw(a, g), .raw(chunk, _)):
            (flops, patches) = k.project(
                m: m, a: UnsafePointer(a.base), g: UnsafePointer(g.base), scale: s, weightGrad: vw, biasGrad: vb, into: t,
                chunk: chunk, work: work)
        case (.raw, .kept):
            fatalError("a raw snapshot's products are raw or fused")
        }
        var finite = true
        for i in 0..<m { finite = finite && t[i].isFinite }
        guard finite else { throw TENGraDError(.numerical, "Uᵀ·grad overflows (gradient too large)") }
        tCopy.update(from: t, count: m)
        let x = t  // solved in place: x = (K + mλI)⁻¹ Uᵀv
        system.solve(x)
        var sumAbsX = 0.0, tDotX = 0.0
        for i in 0..<m {
            sumAbsX += abs(x[i])
            tDotX += tCopy[i] * x[i]
        }
        let λ = system.damping
        let maxV = max(scanW.maxAbs, scanB.maxAbs)
        // With a base: v − U x first, then divided by λe.
        let direct = maxV + snap.entryBound * sumAbsX
        let bound = base.map { direct * max(1, 1 / (λ * Double($0.smallest))) } ?? direct / λ
        guard sumAbsX.isFinite, bound <= safeMagnitude else {
            throw TENGraDError(.numerical, "the preconditioned update would overflow float32 (bound \(bound))")
        }
        var coefficients = x
        if keep {  // x outlives this call: other layers' calls reuse the workspace before the second phase
            if (preparedX?.count ?? 0) < m { preparedX = try Storage<Double>(count: m, budget: context.budget, what: "prepared update") }
            coefficients = preparedX!.base
            coefficients.update(from: x, count: m)
        }
        var installed = snap
        if system !== snap.system {
            installed = snap.with(system: system)
            replaceSnapshot(installed)
        }
        // ⟨update, v⟩ = (1/λ)(‖v‖² − (Uᵀv)ᵀ x); with a base (1/λ)(vᵀE⁻¹v − (UᵀE⁻¹v)ᵀ x).
        let dot = (vNorm - tDotX) / λ
        record.updateDotGrad = dot
        record.hasUpdate = true
        return PreparedUpdate(
            snapshot: installed, kernel: k, products: products, x: coefficients, damping: λ,
            intermediateBound: base == nil ? 0 : direct, bound: base.map { direct / (λ * Double($0.smallest)) } ?? bound,
            dotGrad: dot, flops: flops, seconds: monotonicSeconds() - start, patches: keep ? nil : patches)
    }

    private func finishUpdate(
        _ p: PreparedUpdate, weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?, scale ν: Double,
        weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?, context: LayerContext
    ) throws(TENGraDError) {
        let start = monotonicSeconds()
        if ν != 1 {
            let bound = max(p.intermediateBound, abs(ν) * p.bound)
            guard bound <= safeMagnitude else {
                throw TENGraDError(.numerical, "the scaled update would overflow float32 (bound \(bound))")
            }
        }
        let snap = p.snapshot, k = p.kernel, base = snap.base, m = snap.m, s = Double(snap.scale), λ = p.damping
        let x = UnsafePointer(p.x)
        let extra = base == nil ? 0 : dims.parameters
        // update = (ν/λ) v − (ν/λ) U x: (ν/λ) v written by one pass of ours (a scaled copy, or in
        // place), then U x accumulated onto it with β = 1. Out of place this replaces a copy and
        // BLAS's β pass; in place it costs what BLAS's β pass did. The same calls on the same
        // numbers either way, so in place and out of place give the same bits on every kernel set
        // (BLAS kernels that fold β into their epilogue round β v differently from a β pass).
        // With a base, v − U x, then divided by (λ/ν) e.
        let (alpha, inverse) = base == nil ? (-ν / λ, Float(ν / λ)) : (-1, 1)
        if case .fused = p.products {} else {
            Reduce.scale(weightGrad, by: inverse, into: weightUpdate, dims.weightCount)
            if let biasUpdate, let biasGrad { Reduce.scale(biasGrad, by: inverse, into: biasUpdate, dims.biasCount) }
        }
        var flops = p.flops
        switch (snap.data, p.products) {
        case let (.perSample(u), _):
            let scratch = try context.workspace.floats(2 * m + extra)
            flops += k.applyKept(
                m: m, u: UnsafePointer(u.base), scale: s, x: x, alpha: alpha, beta: 1, weight: weightUpdate, bias: biasUpdate,
                xf: scratch + m)
        case let (.raw(a, g), .raw(chunk, floats)):
            let work = try context.workspace.floats(floats + extra)
            flops += k.apply(
                m: m, a: UnsafePointer(a.base), g: UnsafePointer(g.base), scale: s, x: x, alpha: alpha, beta: 1,
                weight: weightUpdate, bias: biasUpdate, chunk: chunk, work: work, kept: p.patches)
        case let (.raw(a, g), .fused(f)):
            // (ν/λ) v in the product's epilogue: W = (ν/λ) V − (ν/λ) Gsᵀ A.
            let work = try context.workspace.floats(f.floats)
            flops += f.apply(
                v: weightGrad, biasGrad: biasGrad, beta: inverse, a: UnsafePointer(a.base), g: UnsafePointer(g.base), scale: s,
                x: x, alpha: alpha, positions: k.dims.positions, weight: weightUpdate, bias: biasUpdate, work: work)
        case (.raw, .kept):
            fatalError("a raw snapshot's products are raw or fused")
        }
        if let base {
            base.divide(weightUpdate, count: dims.weightCount, column: 0, times: Float(ν / λ))
            if let biasUpdate { base.divide(biasUpdate, count: dims.biasCount, column: dims.weightCount, times: Float(ν / λ)) }
        }
        record.updateSeconds = p.seconds + (monotonicSeconds() - start)
        record.updateFlops = flops + 2 * Double(m) * Double(m)
        // ⟨update, v⟩ stays the prepared (unscaled) one, as `precondition` records it: the scale is
        // the caller's (KL clipping's ν is computed from it), and klClipFactor gives the same ν again.
        record.updateDotGrad = p.dotGrad
        record.hasUpdate = true
    }
}
