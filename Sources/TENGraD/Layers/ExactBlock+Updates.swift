// Part of `ExactBlock` (ExactBlock.swift: the layer, its settings, snapshots from a batch or rows).
// The updates: the one-call natural gradient and `precondition` of any gradient, with or without
// a diagonal base (docs/DESIGN.md §2, §15).
extension ExactBlock {
    func naturalGradient(
        batch: Int, tokens: Int = 1, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>,
        scale s: Float, weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext
    ) throws(TENGraDError) {
        let start = monotonicSeconds()
        let k = try kernel(tokens: tokens)
        let p = try prepare(batch: batch, activations: a, outputGrads: g, scale: s, kernel: k, context: context)
        let middle = monotonicSeconds()
        let m = p.snapshot.m, system = p.snapshot.system
        // c = (K + mλI)⁻¹ 1; the update of the mean gradient is U c (docs/DESIGN.md §2).
        let c = try context.workspace.doubles(m)
        for i in 0..<m { c[i] = 1 }
        system.solve(c)
        var sumC = 0.0, sumAbsC = 0.0
        for i in 0..<m {
            sumC += c[i]
            sumAbsC += abs(c[i])
        }
        let base = p.snapshot.base
        // With a base the update is E⁻¹ U c: U c, then divided by e in place.
        let bound = p.snapshot.entryBound * sumAbsC * max(1, 1 / Double(base?.smallest ?? 1))
        guard sumAbsC.isFinite, bound <= safeMagnitude else {
            throw TENGraDError(.numerical, "the natural-gradient update would overflow float32 (bound \(bound))")
        }
        let flops: Double
        let kept: UnsafePointer<Float>?
        if case let .perSample(u) = p.snapshot.data { kept = UnsafePointer(u.base) } else { kept = p.workspaceU }
        if let kept {
            let xf = try Storage<Float>(count: m, budget: context.budget, what: "update scratch")
            flops = k.applyKept(
                m: m, u: kept, scale: Double(s), x: c, alpha: 1, beta: 0, weight: weightUpdate, bias: biasUpdate, xf: xf.base)
        } else {
            let available = workspaceFloats(context, reserve: 0)
            let plan = try k.updatePlan(m: m, available: available)
            let work = try context.workspace.floats(plan.floats)
            flops = k.apply(
                m: m, a: a, g: g, scale: Double(s), x: c, alpha: 1, beta: 0, weight: weightUpdate, bias: biasUpdate,
                chunk: plan.chunk, work: work)
        }
        if let base {
            base.divide(weightUpdate, count: dims.weightCount, column: 0, times: 1)
            if let biasUpdate { base.divide(biasUpdate, count: dims.biasCount, column: dims.weightCount, times: 1) }
        }
        commit(p, activations: a, outputGrads: g, context: context)
        record.curvatureSeconds = middle - start
        record.updateSeconds = monotonicSeconds() - middle
        record.updateFlops = flops + 2 * Double(m) * Double(m)
        // ⟨U c, U 1/m⟩ = (1/m) 1ᵀ K c = 1 − λ Σc, since (K + mλI) c = 1.
        record.updateDotGrad = 1 - system.damping * sumC
        record.hasUpdate = true
    }

    func precondition(
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext
    ) throws(TENGraDError) {
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

        // Everything the products need, allocated before any output is written.
        enum Source {
            case kept(u: UnsafePointer<Float>, scratch: UnsafeMutablePointer<Float>)
            case raw(a: UnsafePointer<Float>, g: UnsafePointer<Float>, chunk: Int, work: UnsafeMutablePointer<Float>)
            case fused(FusedLinear, a: UnsafePointer<Float>, g: UnsafePointer<Float>, work: UnsafeMutablePointer<Float>)
        }
        let source: Source
        let w: UnsafeMutablePointer<Float>  // after the products' workspace: E⁻¹v when there is a base
        switch snap.data {
        case let .perSample(u):
            // The float workspace is idle on this path: no allocation per reuse step.
            let scratch = try context.workspace.floats(try checkedSum(try checkedProduct(2, m, what: "2·batch"), extra, what: "workspace"))
            source = .kept(u: UnsafePointer(u.base), scratch: scratch)
            w = scratch + 2 * m
        case let .raw(a, g):
            if let fused {
                let work = try context.workspace.floats(fused.floats)
                source = .fused(fused, a: UnsafePointer(a.base), g: UnsafePointer(g.base), work: work)
                w = work  // not read: no base on this path
                break
            }
            let plan = try k.updatePlan(m: m, available: workspaceFloats(context, reserve: extra * 4))
            let work = try context.workspace.floats(try checkedSum(plan.floats, extra, what: "workspace"))
            source = .raw(a: UnsafePointer(a.base), g: UnsafePointer(g.base), chunk: plan.chunk, work: work)
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
        var keptPatches: Block?
        switch source {
        case let .kept(u, scratch):
            flops = k.projectKept(m: m, u: u, scale: s, weightGrad: vw, biasGrad: vb, into: t, tf: scratch)
        case let .raw(a, g, chunk, work):
            (flops, keptPatches) = k.project(
                m: m, a: a, g: g, scale: s, weightGrad: vw, biasGrad: vb, into: t, chunk: chunk, work: work)
        case let .fused(f, a, g, work):
            let sum = f.project(
                v: vw, bias: vb, a: a, g: g, scale: s, positions: k.dims.positions, into: t, work: work, sums: t + 2 * m)
            scanW = GradientScan(sumOfSquares: sum)
            guard scanW.finite else { throw TENGraDError(.notFinite, "weight_grad contains NaN or Inf") }
            vNorm = scanW.sumSquares + scanB.sumSquares
            flops = 2 * Double(f.n) * Double(f.out) * Double(f.inFeatures + 1)
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
        let bound = base.map { (maxV + snap.entryBound * sumAbsX) * max(1, 1 / (λ * Double($0.smallest))) }
            ?? (maxV + snap.entryBound * sumAbsX) / λ
        guard sumAbsX.isFinite, bound <= safeMagnitude else {
            throw TENGraDError(.numerical, "the preconditioned update would overflow float32 (bound \(bound))")
        }
        // update = (1/λ) v − (1/λ) U x: (1/λ) v written by one pass of ours (a scaled copy, or in
        // place), then U x accumulated onto it with β = 1. Out of place this replaces a copy and
        // BLAS's β pass; in place it costs what BLAS's β pass did. The same calls on the same
        // numbers either way, so in place and out of place give the same bits on every kernel set
        // (BLAS kernels that fold β into their epilogue round β v differently from a β pass).
        let (alpha, inverse) = base == nil ? (-1 / λ, Float(1 / λ)) : (-1, 1)
        if case .fused = source {} else {
            Reduce.scale(weightGrad, by: inverse, into: weightUpdate, dims.weightCount)
            if let biasUpdate, let biasGrad { Reduce.scale(biasGrad, by: inverse, into: biasUpdate, dims.biasCount) }
        }
        switch source {
        case let .kept(u, scratch):
            flops += k.applyKept(
                m: m, u: u, scale: s, x: x, alpha: alpha, beta: 1, weight: weightUpdate, bias: biasUpdate,
                xf: scratch + m)
        case let .raw(a, g, chunk, work):
            flops += k.apply(
                m: m, a: a, g: g, scale: s, x: x, alpha: alpha, beta: 1, weight: weightUpdate, bias: biasUpdate,
                chunk: chunk, work: work, kept: keptPatches)
        case let .fused(f, a, g, work):
            // (1/λ) v in the product's epilogue: W = (1/λ) V − (1/λ) Gsᵀ A.
            flops += f.apply(
                v: weightGrad, biasGrad: biasGrad, beta: inverse, a: a, g: g, scale: s, x: x, alpha: alpha,
                positions: k.dims.positions, weight: weightUpdate, bias: biasUpdate, work: work)
        }
        if let base {
            base.divide(weightUpdate, count: dims.weightCount, column: 0, times: Float(1 / λ))
            if let biasUpdate { base.divide(biasUpdate, count: dims.biasCount, column: dims.weightCount, times: Float(1 / λ)) }
        }
        if system !== snap.system { replaceSnapshot(snap.with(system: system)) }
        record.updateSeconds = monotonicSeconds() - start
        record.updateFlops = flops + 2 * Double(m) * Double(m)
        // ⟨update, v⟩ = (1/λ)(‖v‖² − (Uᵀv)ᵀ x); with a base (1/λ)(vᵀE⁻¹v − (UᵀE⁻¹v)ᵀ x).
        record.updateDotGrad = (vNorm - tDotX) / λ
        record.hasUpdate = true
    }
}
