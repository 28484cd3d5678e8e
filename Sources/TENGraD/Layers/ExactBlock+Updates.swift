// Part of `ExactBlock` (ExactBlock.swift: the layer, its settings, snapshots from a batch or rows).
// The one-call natural gradient, with or without a diagonal base (docs/DESIGN.md §2, §15); the
// precondition of any gradient is ExactBlock+Precondition.swift.
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
}
