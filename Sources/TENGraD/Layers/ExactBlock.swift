/// One registered layer: its geometry, settings, curvature snapshot and statistics, and the two
/// Woodbury entry points (docs/DESIGN.md §2):
///
///     precondition:      (F + λI)⁻¹ v = (1/λ) (v − U (K + mλI)⁻¹ Uᵀ v)
///     natural gradient:  (F + λI)⁻¹ (1/m) U 1 = U (K + mλI)⁻¹ 1
///
/// The mathematics is `BlockKernel`'s, the same for every layer kind; making a snapshot is in
/// ExactBlock+Snapshots.swift. Every call is atomic
/// (docs/DESIGN.md §6): a prepare phase does all that can fail (input scans, allocations, Gram,
/// factorization, the a-priori float32 bound) and yields new values; only then are outputs
/// written and the new snapshot installed.
final class ExactBlock {
    let geometry: any BlockGeometry
    let kernel: BlockKernel
    var dims: BlockDims { kernel.dims }
    /// Gram strategy setting (meaningful for every kind; only convolutions expose it).
    var strategySetting: ConvStrategy = .auto
    var representationSetting: SnapshotRepresentation = .auto
    /// Linear layers over sequences: per-sequence (exact) or per-token samples.
    var tokenMode: TokenMode = .perSequence
    /// The diagonal base the next snapshot takes (nil: λI).
    var baseSetting: DiagonalBase?

    private(set) var snapshot: Snapshot?
    /// Statistics recorded by the calls; `stats` adds the lazily computed condition estimate.
    var record: LayerStats

    /// Per-call workspace target: 64 MiB keeps a chunk of unfolded patches near the last-level
    /// caches while making the chunks' GEMMs large enough to run at full speed.
    static let workspaceTarget = 64 << 20

    init(_ geometry: any BlockGeometry) {
        self.geometry = geometry
        kernel = BlockKernel(geometry)
        record = LayerStats(kind: geometry.kind, parameters: geometry.dims.parameters)
    }

    var stats: LayerStats {
        var s = record
        s.rcond = snapshot?.system.rcond ?? 0
        return s
    }

    var updateDotGrad: Double? { record.hasUpdate ? record.updateDotGrad : nil }

    /// Installs a snapshot (a refresh, a new damping, restored state), keeping the statistics
    /// consistent with it.
    func replaceSnapshot(_ snap: Snapshot?) {
        snapshot = snap
        record.batch = snap?.m ?? 0
        record.snapshotBytes = snap?.bytes ?? 0
        record.representation = snap?.representation ?? .auto
        record.representationBytes = snap?.dataBytes ?? 0
        record.damping = snap?.system.damping ?? 0
        record.jitter = snap?.system.jitter ?? 0
        let model = snap.map { RepresentationModel(dims: dims, batch: $0.m) }
        record.rawBytesEstimate = model?.rawBytes ?? 0
        record.perSampleBytesEstimate = model?.perSampleBytes ?? 0
        record.rawReuseCost = model?.rawReuseCost ?? 0
        record.perSampleReuseCost = model?.perSampleReuseCost ?? 0
    }

    // MARK: - Memory

    /// Floats a workspace may take now: the target, or what the memory limit leaves after
    /// `reserve` bytes still to be allocated by the call (the current float workspace counts as
    /// free, since growing it releases it first).
    func workspaceFloats(_ context: LayerContext, reserve: Int) -> Int {
        var bytes = ExactBlock.workspaceTarget
        if context.budget.limit > 0 {
            bytes = min(bytes, context.budget.limit - context.budget.inUse + context.workspace.floatBytes - reserve)
        }
        return max(bytes, 0) / MemoryLayout<Float>.stride
    }

    /// The kernel of a call over `tokens` positions per sample (1: the layer's own).
    func kernel(tokens: Int) throws(TENGraDError) -> BlockKernel {
        tokens == 1 ? kernel : BlockKernel(try geometry.overTokens(tokens))
    }

    func updateCurvature(
        batch: Int, tokens: Int = 1, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>,
        scale: Float, context: LayerContext
    ) throws(TENGraDError) {
        let start = monotonicSeconds()
        let p = try prepare(batch: batch, activations: activations, outputGrads: outputGrads, scale: scale,
                            kernel: try kernel(tokens: tokens), context: context)
        commit(p, activations: activations, outputGrads: outputGrads, context: context)
        record.curvatureSeconds = monotonicSeconds() - start
    }

    // MARK: - Per-sample gradients as data (docs/DESIGN.md §11)

    /// Writes U of a batch, scaled (row i = s · sample i's gradient, [weight | bias]), to `out`
    /// (m × d). Changes no state; the inputs are checked before anything is written.
    func perSampleGradients(
        batch m: Int, tokens: Int = 1, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>,
        scale s: Float, into out: UnsafeMutablePointer<Float>, context: LayerContext
    ) throws(TENGraDError) {
        let k = try kernel(tokens: tokens)
        let count = try checkedProduct(m, dims.parameters, what: "batch × parameters (per-sample gradients)")
        _ = try scanInputs(k, a, g, start: 0, count: m)
        let chunk = k.formChunk(m: m, available: workspaceFloats(context, reserve: 0))
        let work = try context.workspace.floats(k.geometry.formScratch(samples: chunk))
        _ = k.formAllGradients(m: m, a: a, g: g, into: out, chunk: chunk, work: work)
        if s != 1 {
            for i in 0..<count { out[i] *= s }
        }
        guard ArrayScan(out, count: count).finite else {
            throw TENGraDError(.numerical, "the per-sample gradients overflow float32 (inputs too large)")
        }
    }

    /// A per-sample snapshot from U given by the caller (m × d rows, already scaled: the rows of
    /// `perSampleGradients`, e.g. gathered from several processes): K = UUᵀ by one syrk, U kept.
    func updateCurvature(batch m: Int, perSampleGradients u: UnsafePointer<Float>, context: LayerContext) throws(TENGraDError) {
        let start = monotonicSeconds()
        _ = try dims.inputCounts(batch: m)
        let count = try checkedProduct(m, dims.parameters, what: "batch × parameters (per-sample gradients)")
        let scan = ArrayScan(u, count: count)
        guard scan.finite else { throw TENGraDError(.notFinite, "per_sample_gradients contain NaN or Inf") }
        let kept = try Storage<Float>(count: count, budget: context.budget, what: "per-sample gradients (\(m) × \(dims.parameters) floats)")
        let gram = try newGram(m: m, context: context)
        let base = baseSetting
        var flops: Double
        if let base {
            let floats = try kernel.scaledGramFloats(m: m, available: workspaceFloats(context, reserve: m * m * 8))
            let work = try context.workspace.floats(floats)
            flops = kernel.scaledGram(m: m, u: u, base: base, into: gram.base, work: work, floats: floats)
        } else {
            let work = try context.workspace.floats(try checkedProduct(m, m, what: "batch²"))
            flops = kernel.accumulateGram(m: m, u: u, width: dims.parameters, ldu: dims.parameters, into: gram.base, scratch: work)
        }
        let system = try finishSystem(gram, m: m, scale: 1, context: context)
        flops += system.factorFlops
        kept.base.update(from: u, count: count)
        let estimates = gramEstimates(kernel, m: m, uFormed: true)
        let snap = Snapshot(m: m, tokens: 1, scale: 1, data: .perSample(kept), entryBound: Double(scan.maxAbs), system: system,
                            base: base)
        install(Prepared(snapshot: snap, flops: flops, strategy: .explicit, factoredEstimate: estimates.factored,
                         explicitEstimate: estimates.explicit, workspaceU: nil), context: context)
        record.curvatureSeconds = monotonicSeconds() - start
    }

    // MARK: - Updates

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
        let scanW = GradientScan(weightGrad, count: dims.weightCount)
        guard scanW.finite else { throw TENGraDError(.notFinite, "weight_grad contains NaN or Inf") }
        var scanB = GradientScan.empty
        if let biasGrad {
            scanB = GradientScan(biasGrad, count: dims.biasCount)
            guard scanB.finite else { throw TENGraDError(.notFinite, "bias_grad contains NaN or Inf") }
        }
        // A new damping factorizes a new system from the kept Gram; installed only at the end.
        let system = try snap.system.refactored(damping: context.damping, budget: context.budget)
        let k = try kernel(tokens: snap.tokens)
        let m = snap.m, s = Double(snap.scale)
        let t = try context.workspace.doubles(try checkedProduct(2, m, what: "2·batch"))
        let tCopy = t + m
        let base = snap.base
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
        // update = (1/λ) v − (1/λ) U x, as one product accumulated onto the update with β = 1/λ.
        // In place (the update written over v, as tengrad.torch does) no pass is spent on (1/λ)v
        // and BLAS scales with its threads; out of place v is copied first and the same call runs
        // on the same numbers, so both give the same bits.
        let (alpha, inverse) = base == nil ? (-1 / λ, Float(1 / λ)) : (-1, 1)
        if UnsafePointer(weightUpdate) != weightGrad { weightUpdate.update(from: weightGrad, count: dims.weightCount) }
        if let biasUpdate, let biasGrad, UnsafePointer(biasUpdate) != biasGrad {
            biasUpdate.update(from: biasGrad, count: dims.biasCount)
        }
        switch source {
        case let .kept(u, scratch):
            flops += k.applyKept(
                m: m, u: u, scale: s, x: x, alpha: alpha, beta: inverse, weight: weightUpdate, bias: biasUpdate,
                xf: scratch + m)
        case let .raw(a, g, chunk, work):
            flops += k.apply(
                m: m, a: a, g: g, scale: s, x: x, alpha: alpha, beta: inverse, weight: weightUpdate, bias: biasUpdate,
                chunk: chunk, work: work, kept: keptPatches)
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
