/// One registered layer: its geometry, settings, curvature snapshot and statistics, and the two
/// Woodbury entry points (docs/DESIGN.md §2):
///
///     precondition:      (F + λI)⁻¹ v = (1/λ) (v − U (K + mλI)⁻¹ Uᵀ v)
///     natural gradient:  (F + λI)⁻¹ (1/m) U 1 = U (K + mλI)⁻¹ 1
///
/// The mathematics is `BlockKernel`'s, the same for every layer kind; making a snapshot is in
/// ExactBlock+Snapshots.swift, the updates (natural gradient, precondition) in
/// ExactBlock+Updates.swift and ExactBlock+Precondition.swift. Every call is atomic (docs/DESIGN.md §6): a prepare phase does all that can fail (input scans, allocations, Gram,
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
    /// How the next snapshot reads λ.
    var dampingMode: DampingMode = .absolute

    private(set) var snapshot: Snapshot?
    /// Statistics recorded by the calls; `stats` adds the lazily computed condition estimate.
    var record: LayerStats
    /// A two-phase precondition's first phase, until its second (ExactBlock+Precondition.swift);
    /// dropped when the snapshot changes.
    var prepared: PreparedUpdate?
    /// Its x: m doubles of the layer's own, kept while other layers' calls use the workspace.
    var preparedX: Storage<Double>?

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
        prepared = nil
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
        let form = k.formPlan(m: m, available: workspaceFloats(context, reserve: 0))
        let work = try context.workspace.floats(form.floats)
        _ = k.formAllGradients(
            m: m, a: a, g: g, into: out, chunk: form.chunk, work: work, twoThreads: form.twoThreads) { _, _ in }
        if s != 1 { Reduce.scale(out, by: s, into: out, count) }
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
        let (system, dampingScale) = try finishSystem(gram, m: m, scale: 1, context: context)
        flops += system.factorFlops
        kept.base.update(from: u, count: count)
        let estimates = gramEstimates(kernel, m: m, uFormed: true)
        let snap = Snapshot(m: m, tokens: 1, scale: 1, data: .perSample(kept), entryBound: Double(scan.maxAbs), system: system,
                            base: base, dampingScale: dampingScale)
        install(Prepared(snapshot: snap, flops: flops, strategy: .explicit, factoredEstimate: estimates.factored,
                         explicitEstimate: estimates.explicit, workspaceU: nil), context: context)
        record.curvatureSeconds = monotonicSeconds() - start
    }
}
