/// What every layer kind shares: the curvature snapshot and the two Woodbury entry points.
///
/// A layer kind (linear, conv2d) subclasses this and provides the three products that depend on
/// its geometry — the Gram `K = UᵀU`, the projection `Uᵀv` and the combination `U x` — without
/// ever forming U. This class does the rest (SPEC §2):
///
///     precondition:      (F + λI)⁻¹ v = (1/λ) (v − U (K + mλI)⁻¹ Uᵀ v)
///     natural gradient:  (F + λI)⁻¹ (1/m) U 1 = U (K + mλI)⁻¹ 1
///
/// and keeps every call atomic: all that can fail (input scans, Gram, factorization, allocation)
/// happens before state or outputs are touched. Updates are written only when an a-priori bound
/// proves them finite in float32.
class ExactBlockLayer {
    let kind: LayerKind
    let weightCount: Int
    let biasCount: Int

    /// The current curvature snapshot: copies of the batch, and its factorized system.
    struct Snapshot {
        let m: Int
        let activations: Storage<Float>
        let outputGrads: Storage<Float>
        let scale: Float
        /// max |ã| (1 counts when there is a bias) and max |g|, for the overflow bound.
        let maxActivation: Float
        let maxOutputGrad: Float
        let system: DampedSystem
    }

    private(set) var snapshot: Snapshot?
    /// Statistics recorded by the calls; `stats` adds the lazily computed condition estimate.
    var record: LayerStats

    init(kind: LayerKind, weightCount: Int, biasCount: Int) throws(TENGraDError) {
        self.kind = kind
        self.weightCount = weightCount
        self.biasCount = biasCount
        let parameters = try checkedSum(weightCount, biasCount, what: "parameter count")
        record = LayerStats(kind: kind, parameters: parameters)
    }

    var stats: LayerStats {
        var s = record
        s.rcond = snapshot?.system.rcond ?? 0
        return s
    }

    var updateDotGrad: Double? { record.hasUpdate ? record.updateDotGrad : nil }

    /// Replaces the snapshot (restored state), keeping the statistics consistent with it.
    func replaceSnapshot(_ snap: Snapshot?) {
        snapshot = snap
        record.batch = snap?.m ?? 0
        record.snapshotBytes = snap.map { $0.activations.bytes + $0.outputGrads.bytes + $0.system.bytes } ?? 0
        record.damping = snap?.system.damping ?? 0
        record.jitter = snap?.system.jitter ?? 0
    }

    // MARK: - Hooks for the layer kinds

    func inputCounts(batch: Int) throws(TENGraDError) -> (activations: Int, outputGrads: Int) {
        fatalError("subclass responsibility")
    }

    /// Fills `k` (m×m, full symmetric) with K = UᵀU of the batch, s² included, in float64.
    /// Returns the flops spent.
    func buildGram(
        m: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>, scale: Double,
        into k: UnsafeMutablePointer<Double>, context: LayerContext
    ) throws(TENGraDError) -> Double {
        fatalError("subclass responsibility")
    }

    /// Floats of workspace `projectGradient` and `applyU` need for a batch of m; reserved before
    /// any output is written, so those two cannot fail for lack of memory.
    func updateWorkspace(m: Int, context: LayerContext) throws(TENGraDError) -> Int {
        fatalError("subclass responsibility")
    }

    /// t_i = (Uᵀv)_i for the gradient v = [weight | bias]. Returns the flops spent.
    func projectGradient(
        m: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>, scale: Double,
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        into t: UnsafeMutablePointer<Double>, workspace: UnsafeMutablePointer<Float>
    ) -> Double {
        fatalError("subclass responsibility")
    }

    /// weight ← β·weight + α·(U x)_weight and bias likewise (β = 0 overwrites). Returns the flops.
    func applyU(
        m: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>, scale: Double,
        x: UnsafePointer<Double>, alpha: Double, beta: Float,
        weight: UnsafeMutablePointer<Float>, bias: UnsafeMutablePointer<Float>?, workspace: UnsafeMutablePointer<Float>
    ) -> Double {
        fatalError("subclass responsibility")
    }

    /// The one-call update `weight, bias ← U c` from per-sample gradients the layer still holds
    /// from `buildGram` (explicit conv Gram), or nil when it holds none. Returns the flops.
    func applyKeptGradients(
        m: Int, scale: Double, c: UnsafePointer<Double>, weight: UnsafeMutablePointer<Float>,
        bias: UnsafeMutablePointer<Float>?, context: LayerContext
    ) throws(TENGraDError) -> Double? {
        nil
    }

    /// How many products g·ã add up in one entry of a per-sample gradient (1 for linear, the
    /// number of output positions L for a convolution): |(U x)_k| ≤ s · terms · max|g| · max|ã| · Σ|x_i|.
    var termsPerEntry: Double { 1 }

    /// Which conv strategy the last Gram used (none for linear).
    var lastStrategy: ConvStrategy { .auto }

    // MARK: - Curvature

    /// A checked batch made into the next snapshot (its storage not yet filled) and the flops it
    /// took: everything that can fail, done before any state or output is touched.
    private func prepare(
        batch m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>,
        scale s: Float, context: LayerContext
    ) throws(TENGraDError) -> (next: Snapshot, flops: Double) {
        let (countA, countG) = try inputCounts(batch: m)
        let scanA = ArrayScan(a, count: countA)
        guard scanA.finite else { throw TENGraDError(.notFinite, "activations contain NaN or Inf") }
        let scanG = ArrayScan(g, count: countG)
        guard scanG.finite else { throw TENGraDError(.notFinite, "output_grads contain NaN or Inf") }

        // Snapshot storage first (the largest allocation): reuse the current one when the batch
        // size is unchanged; it is overwritten only in `commit`.
        let activations: Storage<Float>, outputGrads: Storage<Float>
        if let old = snapshot, old.m == m {
            activations = old.activations
            outputGrads = old.outputGrads
        } else {
            activations = try Storage<Float>(count: countA, budget: context.budget, what: "snapshot activations")
            outputGrads = try Storage<Float>(count: countG, budget: context.budget, what: "snapshot output gradients")
        }
        let mm = try checkedProduct(m, m, what: "batch²")
        let gram = try Storage<Double>(count: mm, budget: context.budget, what: "Gram (\(m)×\(m) doubles)")
        var flops = try buildGram(m: m, activations: a, outputGrads: g, scale: Double(s), into: gram.base, context: context)
        var finite = true
        for i in 0..<mm { finite = finite && gram.base[i].isFinite }
        guard finite else {
            throw TENGraDError(.numerical, "the Gram of the per-sample gradients overflows (inputs too large)")
        }
        let system = try DampedSystem(gram: gram, m: m, damping: context.damping, budget: context.budget)
        flops += system.factorFlops
        let next = Snapshot(
            m: m, activations: activations, outputGrads: outputGrads, scale: s,
            maxActivation: max(scanA.maxAbs, biasCount > 0 ? 1 : 0), maxOutputGrad: scanG.maxAbs, system: system)
        return (next, flops)
    }

    /// Copies the batch into the prepared snapshot and makes it current. Cannot fail.
    private func commit(_ next: Snapshot, flops: Double, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, context: LayerContext) {
        next.activations.base.update(from: a, count: next.activations.count)
        next.outputGrads.base.update(from: g, count: next.outputGrads.count)
        replaceSnapshot(next)
        record.convStrategy = lastStrategy
        record.workspaceBytes = context.workspace.bytes
        record.curvatureFlops = flops
    }

    func updateCurvature(
        batch: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>,
        scale: Float, context: LayerContext
    ) throws(TENGraDError) {
        let start = monotonicSeconds()
        let (next, flops) = try prepare(batch: batch, activations: activations, outputGrads: outputGrads, scale: scale, context: context)
        commit(next, flops: flops, activations: activations, outputGrads: outputGrads, context: context)
        record.curvatureSeconds = monotonicSeconds() - start
    }

    // MARK: - Updates

    func naturalGradient(
        batch: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>,
        scale s: Float, weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext
    ) throws(TENGraDError) {
        let start = monotonicSeconds()
        let (p, curvatureFlops) = try prepare(batch: batch, activations: activations, outputGrads: outputGrads, scale: s, context: context)
        let middle = monotonicSeconds()
        let m = p.m
        // c = (K + mλI)⁻¹ 1; the update of the mean gradient is U c (SPEC §2, empirical fast path).
        let c = try context.workspace.doubles(m)
        for i in 0..<m { c[i] = 1 }
        p.system.solve(c)
        var sumC = 0.0, sumAbsC = 0.0
        for i in 0..<m {
            sumC += c[i]
            sumAbsC += abs(c[i])
        }
        let bound = Double(s) * termsPerEntry * Double(p.maxOutputGrad) * Double(p.maxActivation) * sumAbsC
        guard sumAbsC.isFinite, bound <= safeMagnitude else {
            throw TENGraDError(.numerical, "the natural-gradient update would overflow float32 (bound \(bound))")
        }
        let flops: Double
        if let kept = try applyKeptGradients(m: m, scale: Double(s), c: c, weight: weightUpdate, bias: biasUpdate, context: context) {
            flops = kept
        } else {
            let work = try context.workspace.floats(try updateWorkspace(m: m, context: context))
            flops = applyU(
                m: m, activations: activations, outputGrads: outputGrads, scale: Double(s), x: c, alpha: 1, beta: 0,
                weight: weightUpdate, bias: biasUpdate, workspace: work)
        }
        commit(p, flops: curvatureFlops, activations: activations, outputGrads: outputGrads, context: context)
        record.curvatureSeconds = middle - start
        record.updateSeconds = monotonicSeconds() - middle
        record.updateFlops = flops + 2 * Double(m) * Double(m)
        // ⟨U c, U 1/m⟩ = (1/m) 1ᵀ K c = 1 − λ Σc, since (K + mλI) c = 1.
        record.updateDotGrad = 1 - p.system.damping * sumC
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
        let scanW = GradientScan(weightGrad, count: weightCount)
        guard scanW.finite else { throw TENGraDError(.notFinite, "weight_grad contains NaN or Inf") }
        var scanB = GradientScan.empty
        if let biasGrad {
            scanB = GradientScan(biasGrad, count: biasCount)
            guard scanB.finite else { throw TENGraDError(.notFinite, "bias_grad contains NaN or Inf") }
        }
        try snap.system.refactor(damping: context.damping, budget: context.budget)
        let m = snap.m
        let a = snap.activations.base, g = snap.outputGrads.base
        let s = Double(snap.scale)
        let work = try context.workspace.floats(try updateWorkspace(m: m, context: context))
        let t = try context.workspace.doubles(try checkedProduct(2, m, what: "2·batch"))
        let tCopy = t + m

        var flops = projectGradient(
            m: m, activations: a, outputGrads: g, scale: s, weightGrad: weightGrad, biasGrad: biasGrad,
            into: t, workspace: work)
        var finite = true
        for i in 0..<m { finite = finite && t[i].isFinite }
        guard finite else { throw TENGraDError(.numerical, "Uᵀ·grad overflows (gradient too large)") }
        tCopy.update(from: t, count: m)
        let x = t  // solved in place: x = (K + mλI)⁻¹ Uᵀv
        snap.system.solve(x)
        var sumAbsX = 0.0, tDotX = 0.0
        for i in 0..<m {
            sumAbsX += abs(x[i])
            tDotX += tCopy[i] * x[i]
        }
        let λ = snap.system.damping
        let maxV = max(scanW.maxAbs, scanB.maxAbs)
        let bound = (maxV + s * termsPerEntry * Double(snap.maxOutputGrad) * Double(snap.maxActivation) * sumAbsX) / λ
        guard sumAbsX.isFinite, bound <= safeMagnitude else {
            throw TENGraDError(.numerical, "the preconditioned update would overflow float32 (bound \(bound))")
        }
        // update = (1/λ) v − (1/λ) U x, accumulated onto v (copied unless in place) with β = 1/λ.
        if UnsafePointer(weightUpdate) != weightGrad { weightUpdate.update(from: weightGrad, count: weightCount) }
        if let biasUpdate, let biasGrad, UnsafePointer(biasUpdate) != biasGrad { biasUpdate.update(from: biasGrad, count: biasCount) }
        flops += applyU(
            m: m, activations: a, outputGrads: g, scale: s, x: x, alpha: -1 / λ, beta: Float(1 / λ),
            weight: weightUpdate, bias: biasUpdate, workspace: work)
        record.damping = λ
        record.jitter = snap.system.jitter
        record.updateSeconds = monotonicSeconds() - start
        record.updateFlops = flops + 2 * Double(m) * Double(m)
        // ⟨update, v⟩ = (1/λ)(‖v‖² − (Uᵀv)ᵀ x).
        record.updateDotGrad = (scanW.sumSquares + scanB.sumSquares - tDotX) / λ
        record.hasUpdate = true
    }
}
