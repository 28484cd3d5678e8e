// Part of `ExactBlock` (ExactBlock.swift: the layer, its settings and the entry points).
// Making a snapshot: the checked batch, its Gram by either strategy in either representation,
// the factorization, and installing the result.
extension ExactBlock {
    /// A checked batch made into the next snapshot, with what the call needs beyond it.
    struct Prepared {
        let snapshot: Snapshot
        let flops: Double
        let strategy: ConvStrategy
        let factoredEstimate: Double
        let explicitEstimate: Double
        /// U of a raw snapshot whose explicit Gram formed it whole in the workspace (valid until
        /// the float workspace is requested again): the one-call update applies it directly.
        let workspaceU: UnsafePointer<Float>?
    }

    /// Everything that can fail in a refresh, done before any state or output is touched.
    func prepare(
        batch m: Int, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>,
        scale s: Float, kernel k: BlockKernel, context: LayerContext
    ) throws(TENGraDError) -> Prepared {
        _ = try k.dims.inputCounts(batch: m)
        switch representationSetting == .auto ? k.geometry.defaultRepresentation : representationSetting {
        case .raw:
            return try prepareRaw(m: m, a: a, g: g, scale: s, kernel: k, context: context)
        case .perSample:
            return try preparePerSample(m: m, a: a, g: g, scale: s, kernel: k, context: context)
        case .auto:
            guard RepresentationModel(dims: k.dims, batch: m).pick(memoryLimit: context.budget.limit) == .perSample else {
                return try prepareRaw(m: m, a: a, g: g, scale: s, kernel: k, context: context)
            }
            do {
                return try preparePerSample(m: m, a: a, g: g, scale: s, kernel: k, context: context)
            } catch where error.code == .outOfMemory {
                // U does not fit what the memory limit leaves: the raw batch may.
                return try prepareRaw(m: m, a: a, g: g, scale: s, kernel: k, context: context)
            }
        }
    }

    /// Rejects NaN and Inf in samples `start..<start+count` of the batch; returns max |a|, max |g|.
    func scanInputs(
        _ k: BlockKernel, _ a: UnsafePointer<Float>, _ g: UnsafePointer<Float>, start: Int, count: Int
    ) throws(TENGraDError) -> (a: Float, g: Float) {
        let scanA = ArrayScan(a + start * k.dims.inputSize, count: count * k.dims.inputSize)
        guard scanA.finite else { throw TENGraDError(.notFinite, "activations contain NaN or Inf") }
        try k.geometry.checkActivations(a + start * k.dims.inputSize, count: count * k.dims.inputSize)
        let scanG = ArrayScan(g + start * k.dims.outputSize, count: count * k.dims.outputSize)
        guard scanG.finite else { throw TENGraDError(.notFinite, "output_grads contain NaN or Inf") }
        return (scanA.maxAbs, scanG.maxAbs)
    }

    /// Flop-model estimates of the two Gram strategies; `uFormed`: U exists anyway (per-sample
    /// snapshot), so the explicit Gram costs only its syrk.
    func gramEstimates(_ k: BlockKernel, m: Int, uFormed: Bool) -> (factored: Double, explicit: Double) {
        let dm = Double(m), dl = Double(k.dims.positions), d = Double(k.dims.parameters)
        let factored = Double(k.dims.groups) * dm * dm * dl * dl * Double(k.dims.patch + k.dims.groupOut + 1)
        let syrk = dm * dm * d
        return (factored, uFormed ? syrk : 2 * dm * dl * Double(k.dims.weightCount) + syrk)
    }

    /// With a diagonal base only the explicit Gram (and a sparse kind's own) can weight U's columns.
    private func pickStrategy(_ estimates: (factored: Double, explicit: Double), _ k: BlockKernel) -> ConvStrategy {
        if baseSetting != nil && k.sparse == nil { return .explicit }
        if strategySetting != .auto { return strategySetting }
        if geometry.defaultStrategy != .auto { return geometry.defaultStrategy }
        return estimates.factored < estimates.explicit ? .factored : .explicit
    }

    /// K (unscaled) into a new m×m Storage, s² applied, checked finite, and factorized with the
    /// layer's λ (relative damping: λ · tr(K)/(m·min(m, d))); returns the system and λ's factor.
    func finishSystem(
        _ gram: Storage<Double>, m: Int, scale s: Float, context: LayerContext
    ) throws(TENGraDError) -> (system: DampedSystem, dampingScale: Double) {
        let s2 = Double(s) * Double(s)
        var finite = true
        for i in 0..<(m * m) {
            gram.base[i] *= s2
            finite = finite && gram.base[i].isFinite
        }
        guard finite else {
            throw TENGraDError(.numerical, "the Gram of the per-sample gradients overflows (inputs too large)")
        }
        let factor = dampingMode == .relative ? Snapshot.relativeScale(gram, m: m, parameters: dims.parameters) : 1
        return (try DampedSystem(gram: gram, m: m, damping: context.damping * factor, budget: context.budget), factor)
    }

    func newGram(m: Int, context: LayerContext) throws(TENGraDError) -> Storage<Double> {
        let gram = try Storage<Double>(count: try checkedProduct(m, m, what: "batch²"), budget: context.budget, what: "Gram (\(m)×\(m) doubles)")
        gram.base.update(repeating: 0, count: m * m)
        return gram
    }

    /// Raw snapshot: storage for the batch copies (the current one reused when it has the same
    /// size — batch and tokens; it is overwritten only in `commit`), the Gram by either strategy.
    private func prepareRaw(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Float, kernel k: BlockKernel, context: LayerContext
    ) throws(TENGraDError) -> Prepared {
        let (countA, countG) = try k.dims.inputCounts(batch: m)
        let maxima = try scanInputs(k, a, g, start: 0, count: m)
        let activations: Storage<Float>, outputGrads: Storage<Float>
        if let old = snapshot, case let .raw(oldA, oldG) = old.data, oldA.count == countA, oldG.count == countG {
            (activations, outputGrads) = (oldA, oldG)
        } else {
            activations = try Storage<Float>(count: countA, budget: context.budget, what: "snapshot activations")
            outputGrads = try Storage<Float>(count: countG, budget: context.budget, what: "snapshot output gradients")
        }
        let gram = try newGram(m: m, context: context)
        let estimates = gramEstimates(k, m: m, uFormed: false)
        let strategy = pickStrategy(estimates, k)
        let base = baseSetting
        // Still to come after the Gram: the Cholesky factor (m² doubles) and the solve's 2m doubles.
        let available = workspaceFloats(context, reserve: (m * m + 2 * m) * MemoryLayout<Double>.stride)
        var flops: Double
        var workspaceU: UnsafePointer<Float>?
        if strategy == .factored {
            let c = k.factoredChunk(m: m, available: available)
            let work = try context.workspace.floats(try k.factoredWorkspace(chunk: c, m: m))
            flops = k.factoredGram(m: m, a: a, g: g, into: gram.base, chunk: c, work: work, base: base)
        } else {
            let plan = try k.explicitPlan(m: m, available: available)
            let work = try context.workspace.floats(plan.floats)
            (flops, workspaceU) = k.explicitGram(m: m, a: a, g: g, into: gram.base, plan: plan, work: work, base: base)
        }
        let (system, dampingScale) = try finishSystem(gram, m: m, scale: s, context: context)
        flops += system.factorFlops
        let snap = Snapshot(
            m: m, tokens: k.geometry.tokens, scale: s, data: .raw(activations: activations, outputGrads: outputGrads),
            entryBound: Snapshot.rawEntryBound(scale: s, dims: dims, maxPatch: k.geometry.patchBound(maxActivation: maxima.a), maxOutputGrad: maxima.g),
            system: system, base: base, dampingScale: dampingScale)
        return Prepared(
            snapshot: snap, flops: flops, strategy: strategy, factoredEstimate: estimates.factored,
            explicitEstimate: estimates.explicit, workspaceU: workspaceU)
    }

    /// Per-sample snapshot: U formed into new storage (the explicit Gram's work anyway), then its
    /// Gram by one syrk (or the factored strategy if forced or cheaper). The inputs are scanned for
    /// NaN and Inf chunk by chunk just before they are used, while in cache (the bound comes from U).
    private func preparePerSample(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Float, kernel k: BlockKernel, context: LayerContext
    ) throws(TENGraDError) -> Prepared {
        let count = try checkedProduct(m, k.dims.parameters, what: "batch × parameters (per-sample gradients)")
        let u = try Storage<Float>(count: count, budget: context.budget, what: "per-sample gradients (\(m) × \(k.dims.parameters) floats)")
        let gram = try newGram(m: m, context: context)
        let estimates = gramEstimates(k, m: m, uFormed: true)
        let strategy = pickStrategy(estimates, k)
        let base = baseSetting
        let available = workspaceFloats(context, reserve: (m * m + 2 * m) * MemoryLayout<Double>.stride)
        let form = k.formPlan(m: m, available: available)
        var need = form.floats
        var factoredChunk = 0
        if strategy == .factored {
            factoredChunk = k.factoredChunk(m: m, available: available)
            need = max(need, try k.factoredWorkspace(chunk: factoredChunk, m: m))
        } else if base != nil {
            need = max(need, try k.scaledGramFloats(m: m, available: available))
        } else {
            need = max(need, m * m)  // the float32 syrk's output
        }
        let work = try context.workspace.floats(need)
        var flops = try k.formAllGradients(
            m: m, a: a, g: g, into: u.base, chunk: form.chunk, work: work, twoThreads: form.twoThreads
        ) { (start, count) throws(TENGraDError) in _ = try scanInputs(k, a, g, start: start, count: count) }
        // The bound on |U| entries (and their finiteness): with the Gram taken from U itself, its
        // diagonal K_ii = s²‖u_i‖² ≥ s² max_j u_ij² is finite exactly when row i is finite (NaN and
        // Inf propagate through the syrk; entries above √FLT_MAX overflow it), and finishSystem
        // refuses a Gram that is not. That saves a pass over U (hundreds of MB for large
        // convolutions). The factored Gram does not read U: scan it.
        var scannedBound: Double?
        if strategy == .factored {
            let scan = ArrayScan(u.base, count: count)
            guard scan.finite else {
                throw TENGraDError(.numerical, "the per-sample gradients overflow float32 (inputs too large)")
            }
            scannedBound = Double(s) * Double(scan.maxAbs)
            flops += k.factoredGram(m: m, a: a, g: g, into: gram.base, chunk: factoredChunk, work: work, base: base)
        } else if let base {
            flops += k.scaledGram(m: m, u: u.base, base: base, into: gram.base, work: work, floats: need)
        } else {
            flops += k.accumulateGram(m: m, u: u.base, width: k.dims.parameters, ldu: k.dims.parameters, into: gram.base, scratch: work)
        }
        let (system, dampingScale) = try finishSystem(gram, m: m, scale: s, context: context)
        flops += system.factorFlops
        let entryBound = scannedBound ?? Self.diagonalBound(system, parameters: k.dims.parameters, base: base)
        let snap = Snapshot(
            m: m, tokens: k.geometry.tokens, scale: s, data: .perSample(u), entryBound: entryBound, system: system, base: base,
            dampingScale: dampingScale)
        return Prepared(
            snapshot: snap, flops: flops, strategy: strategy, factoredEstimate: estimates.factored,
            explicitEstimate: estimates.explicit, workspaceU: nil)
    }

    /// max_ij |s·u_ij| ≤ max_i √K_ii for a Gram taken from U's own float32 syrk, whose sum of d
    /// squares may round low by up to d·2⁻²⁴ relative (with a base, K̃_ii = Σ_j u_ij²/e_j: times
    /// the largest e, and the rounding of the scaling).
    static func diagonalBound(_ system: DampedSystem, parameters d: Int, base: DiagonalBase?) -> Double {
        let m = system.m
        var largest = 0.0
        for i in 0..<m { largest = max(largest, system.gram.base[i * m + i]) }
        let e = base.map { Double($0.largest) * (1 + 0x1p-20) } ?? 1
        return (largest * e * (1 + Double(d) * 0x1p-24)).squareRoot()
    }

    /// Copies the batch into a raw snapshot and installs it. Cannot fail.
    func commit(_ p: Prepared, activations a: UnsafePointer<Float>, outputGrads g: UnsafePointer<Float>, context: LayerContext) {
        if case let .raw(sa, sg) = p.snapshot.data {
            sa.base.update(from: a, count: sa.count)
            sg.base.update(from: g, count: sg.count)
        }
        install(p, context: context)
    }

    /// Installs a prepared snapshot and records how it was made. Cannot fail.
    func install(_ p: Prepared, context: LayerContext) {
        replaceSnapshot(p.snapshot)
        // The Gram strategy is a choice for some kinds (convolutions, affine) and for any layer over tokens.
        let chosen = geometry.reportsStrategy || p.snapshot.tokens > 1
        record.convStrategy = chosen ? p.strategy : .auto
        record.factoredFlopsEstimate = chosen ? p.factoredEstimate : 0
        record.explicitFlopsEstimate = chosen ? p.explicitEstimate : 0
        record.workspaceBytes = context.workspace.bytes
        record.curvatureFlops = p.flops
    }
}
