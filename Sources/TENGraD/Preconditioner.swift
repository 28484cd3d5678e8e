/// An exact block-diagonal natural-gradient preconditioner (TENGraD, Soori et al., 2021).
///
/// Register the model's layers once, then per step hand each layer the batch's inputs
/// (activations) and the gradients of the loss with respect to its outputs:
///
/// * `naturalGradient` — empirical Fisher in one call: takes a curvature snapshot from the batch
///   and returns `(F + λI)⁻¹` of the batch's mean gradient, as `U (UᵀU + mλI)⁻¹ 1`;
/// * `updateCurvature` then `precondition` — the reuse path: a snapshot (e.g. from sampled labels,
///   or refreshed every T steps) applied to any gradient, `(1/λ)(v − U (UᵀU + mλI)⁻¹ Uᵀv)`.
///
/// Every method validates its input first and throws a `TENGraDError`; a call that throws leaves
/// the preconditioner exactly as it was. An instance is used by one thread at a time.
public final class Preconditioner {
    /// Default λ: a common starting damping of KFAC-style optimizers for unit-scale losses.
    public static let defaultDamping = 0.1

    /// λ of `F + λI`, for every layer.
    public internal(set) var damping: Double = Preconditioner.defaultDamping

    var layers: [ExactBlock] = []
    let budget = MemoryBudget()
    private let workspace: Workspace

    public init() {
        workspace = Workspace(budget: budget)
    }

    // MARK: - Settings

    /// Sets λ (finite, > 0). Snapshots are kept; the next update re-factorizes `UᵀU + mλI` from the
    /// kept Gram. Call it between steps to schedule the damping.
    public func setDamping(_ newValue: Double) throws(TENGraDError) {
        guard newValue.isFinite, newValue > 0 else {
            throw .invalid("damping must be finite and > 0, got \(newValue)")
        }
        damping = newValue
    }

    /// Cap on the bytes this preconditioner holds (snapshots and workspace); 0 = none (default).
    public var memoryLimit: Int { budget.limit }

    /// Bytes currently held (snapshots and workspace).
    public var memoryInUse: Int { budget.inUse }

    public func setMemoryLimit(_ bytes: Int) throws(TENGraDError) {
        guard bytes >= 0 else { throw .invalid("memory limit must be >= 0 (0 = none), got \(bytes)") }
        budget.limit = bytes
    }

    /// OpenBLAS threads for this preconditioner's calls; 0 (default) leaves OpenBLAS's own setting.
    /// With n > 0 every call sets OpenBLAS's process-wide count to n and restores it on return
    /// (docs/DESIGN.md §8: short calls right after a host framework's parallel work run faster on
    /// one thread than on a pool that competes with the host's spinning threads).
    public private(set) var blasThreads = 0

    public func setBLASThreads(_ count: Int) throws(TENGraDError) {
        guard (0...1024).contains(count) else { throw .invalid("BLAS threads must be 0 (as configured) to 1024, got \(count)") }
        blasThreads = count
    }

    // MARK: - Layers

    public var layerCount: Int { layers.count }

    /// Registers a linear layer `y = W a (+ b)`, `W` of shape [out][in]. Returns its id (0, 1, …).
    @discardableResult
    public func addLinear(inFeatures: Int, outFeatures: Int, bias: Bool) throws(TENGraDError) -> Int {
        try append(ExactBlock(LinearGeometry(inFeatures: inFeatures, outFeatures: outFeatures, hasBias: bias)))
    }

    /// Registers a 2-D convolution (PyTorch semantics; see `Conv2dShape`). Returns its id.
    @discardableResult
    public func addConv2d(_ shape: Conv2dShape) throws(TENGraDError) -> Int {
        try append(ExactBlock(Conv2dGeometry(shape)))
    }

    /// Forces a convolution's Gram strategy (`.auto`, the default, lets the flop model choose).
    public func setConvStrategy(layer id: Int, _ strategy: ConvStrategy) throws(TENGraDError) {
        // Linear layers take it too: it decides their Gram when called over tokens (T > 1).
        try layer(id).strategySetting = strategy
    }

    /// Forces what a layer's snapshots keep (`.auto`, the default, lets the cost model choose at
    /// each refresh; docs/DESIGN.md §4). Takes effect at the next curvature update.
    public func setSnapshotRepresentation(layer id: Int, _ representation: SnapshotRepresentation) throws(TENGraDError) {
        try layer(id).representationSetting = representation
    }

    /// The representation setting of a layer.
    public func snapshotRepresentation(layer id: Int) throws(TENGraDError) -> SnapshotRepresentation {
        try layer(id).representationSetting
    }

    /// How a linear layer called over token sequences defines its samples (`TokenMode`); takes
    /// effect at the next curvature update. Conv layers take `.perSequence` only.
    public func setTokenMode(layer id: Int, _ mode: TokenMode) throws(TENGraDError) {
        let l = try layer(id)
        guard l.geometry.kind == .linear || mode == .perSequence else {
            throw .invalid("token modes apply to linear layers; layer \(id) is a conv2d layer")
        }
        l.tokenMode = mode
    }

    public func tokenMode(layer id: Int) throws(TENGraDError) -> TokenMode {
        try layer(id).tokenMode
    }

    func append(_ layer: ExactBlock) throws(TENGraDError) -> Int {
        guard layers.count < Int(Int32.max) else { throw .invalid("too many layers") }
        layers.append(layer)
        return layers.count - 1
    }

    private func layer(_ id: Int) throws(TENGraDError) -> ExactBlock {
        guard id >= 0, id < layers.count else {
            throw .invalid("unknown layer id \(id) (\(layers.count) layers registered)")
        }
        return layers[id]
    }

    /// Element counts of every array a call on `layer` with `batch` samples reads or writes.
    public struct ArrayCounts: Sendable, Equatable {
        public var activations: Int
        public var outputGrads: Int
        public var weight: Int
        /// 0 when the layer has no bias (its bias pointers must then be absent).
        public var bias: Int
        /// Numbers in one per-sample gradient row: weight + bias.
        public var parameters: Int { weight + bias }
        /// batch × parameters: the per-sample gradient rows of the batch.
        public var perSampleGradients: Int
        /// batch × tokens: the mask of a sequence call.
        public var mask: Int
    }

    /// Overflow-checked sizes of the arrays of a call; `batch` 0 gives the parameter sizes only.
    public func arrayCounts(layer id: Int, batch: Int, tokens: Int = 1) throws(TENGraDError) -> ArrayCounts {
        let l = try layer(id)
        let inputs = batch == 0 ? (0, 0) : try l.kernel(tokens: tokens).dims.inputCounts(batch: batch)
        let rows = try checkedProduct(batch, l.dims.parameters, what: "batch × parameters (per-sample gradients)")
        return ArrayCounts(activations: inputs.0, outputGrads: inputs.1, weight: l.dims.weightCount, bias: l.dims.biasCount,
                           perSampleGradients: rows, mask: try checkedProduct(batch, tokens, what: "batch × tokens"))
    }

    /// Kind and shape of a registered layer.
    public enum Layer: Equatable, Sendable {
        case linear(inFeatures: Int, outFeatures: Int, bias: Bool)
        case conv2d(Conv2dShape)
    }

    public func layerDescription(layer id: Int) throws(TENGraDError) -> Layer {
        try layer(id).geometry.description
    }

    /// Diagnostics of one layer.
    public func stats(layer id: Int) throws(TENGraDError) -> LayerStats {
        try layer(id).stats
    }

    // MARK: - Preconditioning

    private var context: LayerContext { LayerContext(damping: damping, budget: budget, workspace: workspace) }

    /// Runs a computing call with the handle's BLAS threads; if it fails, the workspace goes back
    /// to its size before the call, so a failed call changes nothing, memory in use included.
    private func compute(_ body: () throws(TENGraDError) -> Void) throws(TENGraDError) {
        let mark = workspace.mark
        do {
            try BLAS.withThreads(blasThreads, body)
        } catch {
            workspace.restore(mark)
            throw error
        }
    }

    /// `natural_gradient` writes its updates while it still reads the batch (and keeps a copy of it
    /// in the snapshot), so an update buffer must not overlap the activations or output gradients.
    private static func checkNoOverlap(
        outputs weight: (UnsafeMutablePointer<Float>, Int), _ bias: (UnsafeMutablePointer<Float>?, Int),
        inputs: [(UnsafePointer<Float>, Int, String)]
    ) throws(TENGraDError) {
        func overlaps(_ p: UnsafeRawPointer, _ n: Int, _ q: UnsafeRawPointer, _ k: Int) -> Bool {
            p < q + 4 * k && q < p + 4 * n
        }
        for (input, count, name) in inputs {
            if overlaps(weight.0, weight.1, input, count) {
                throw .invalid("weight_update overlaps \(name): natural_gradient's outputs must not alias its inputs")
            }
            if let b = bias.0, overlaps(b, bias.1, input, count) {
                throw .invalid("bias_update overlaps \(name): natural_gradient's outputs must not alias its inputs")
            }
        }
    }

    private static func checkScale(_ s: Float) throws(TENGraDError) {
        guard s.isFinite, s > 0 else { throw .invalid("grad_scale must be finite and > 0, got \(s)") }
    }

    private static func base<T>(_ buffer: UnsafeBufferPointer<T>, count: Int, _ name: String) throws(TENGraDError) -> UnsafePointer<T> {
        guard buffer.count == count else { throw .shape("\(name) has \(buffer.count) elements, the layer needs \(count)") }
        guard let p = buffer.baseAddress else { throw .invalid("\(name) is NULL") }
        return p
    }

    private static func bias<T>(_ buffer: UnsafeBufferPointer<T>?, count: Int, _ name: String) throws(TENGraDError) -> UnsafePointer<T>? {
        guard let buffer else {
            if count > 0 { throw .invalid("\(name) is missing but the layer has a bias") }
            return nil
        }
        guard count > 0 else { throw .invalid("\(name) is given but the layer has no bias") }
        return try base(buffer, count: count, name)
    }

    /// The checked update arrays of a call, as mutable pointers.
    private static func updateOutputs(
        _ l: ExactBlock, _ weightUpdate: UnsafeMutableBufferPointer<Float>,
        _ biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) -> (UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>?) {
        let wu = try base(UnsafeBufferPointer(weightUpdate), count: l.dims.weightCount, "weight_update")
        let bu = try bias(biasUpdate.map { UnsafeBufferPointer($0) }, count: l.dims.biasCount, "bias_update")
        return (UnsafeMutablePointer(mutating: wu), bu.map { UnsafeMutablePointer(mutating: $0) })
    }

    /// Takes a curvature snapshot of `layer` from a batch, replacing the previous one.
    /// `activations` is [batch][in] (linear), `outputGrads` [batch][out]; `gradScale` s makes the
    /// output gradients per-sample ones (mean-reduced loss: s = batch; sum-reduced: s = 1).
    public func updateCurvature(
        layer id: Int, batch: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, gradScale: Float
    ) throws(TENGraDError) {
        try updateCurvature(layer: id, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads,
                            mask: nil, gradScale: gradScale)
    }

    /// The per-sample gradients of a batch as data: row i of `out` (batch × (weight + bias)) is
    /// `gradScale` × sample i's gradient, weight then bias in the gradients' layout. No state
    /// changes. With `updateCurvature(layer:batch:perSampleGradients:)` on another handle (another
    /// process), a snapshot travels as these rows (docs/DESIGN.md §11). On failure `out` is
    /// unspecified.
    public func perSampleGradients(
        layer id: Int, batch: Int, activations: UnsafeBufferPointer<Float>, outputGrads: UnsafeBufferPointer<Float>,
        gradScale: Float, into out: UnsafeMutableBufferPointer<Float>
    ) throws(TENGraDError) {
        try perSampleGradients(layer: id, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads,
                               mask: nil, gradScale: gradScale, into: out)
    }

    /// `perSampleGradients` of sequences (a linear layer over tokens, per-sequence mode): row i is
    /// sequence i's gradient, `s Σ_t mask_it g_it ã_itᵀ`; one row per sequence whatever T and the
    /// mask, so processes with different sequence lengths send rows of one width.
    public func perSampleGradients(
        layer id: Int, batch: Int, tokens: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float,
        into out: UnsafeMutableBufferPointer<Float>
    ) throws(TENGraDError) {
        let l = try layer(id)
        guard l.tokenMode == .perSequence || (tokens == 1 && mask == nil) else {
            throw .invalid("per-sample gradient rows of a per-token layer: use its raw tokens (layer \(id))")
        }
        let count = try checkedProduct(batch, l.dims.parameters, what: "batch × parameters (per-sample gradients)")
        let o = UnsafeMutablePointer(mutating: try Self.base(UnsafeBufferPointer(out), count: count, "out_rows"))
        try withSequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale,
                              outputs: ((o, count), (nil, 0))) { (b) throws(TENGraDError) in
            try l.perSampleGradients(batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads,
                                     scale: gradScale, into: o, context: context)
        }
    }

    /// Takes a curvature snapshot from per-sample gradient rows (batch × (weight + bias), already
    /// scaled, as `perSampleGradients` writes them), replacing the previous one. The snapshot keeps
    /// the rows (per-sample representation, whatever the representation setting) and equals the one
    /// `updateCurvature` would take from the batch the rows came from, up to float32 rounding.
    public func updateCurvature(layer id: Int, batch: Int, perSampleGradients rows: UnsafeBufferPointer<Float>) throws(TENGraDError) {
        let l = try layer(id)
        _ = try l.dims.inputCounts(batch: batch)
        let count = try checkedProduct(batch, l.dims.parameters, what: "batch × parameters (per-sample gradients)")
        let u = try Self.base(rows, count: count, "per_sample_gradients")
        try compute { () throws(TENGraDError) in
            try l.updateCurvature(batch: batch, perSampleGradients: u, context: context)
        }
    }

    // MARK: - Sequences (linear layers over tokens, docs/DESIGN.md §12)

    /// A sequence batch as the layer's calls take it: samples, positions and the arrays — the
    /// caller's, or copies (kept alive here) with masked tokens zeroed (per sequence) or left out
    /// (per token).
    private struct SequenceBatch {
        let batch: Int
        let tokens: Int
        let activations: UnsafePointer<Float>
        let outputGrads: UnsafePointer<Float>
        let copies: (Storage<Float>, Storage<Float>)?
    }

    /// Checks a sequence call's arrays and mask (batch × tokens bytes, each 0 or 1) and applies
    /// the layer's token mode. Nothing is written anywhere the caller can see.
    private func sequenceBatch(
        _ l: ExactBlock, batch: Int, tokens: Int, _ activations: UnsafeBufferPointer<Float>,
        _ outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float
    ) throws(TENGraDError) -> SequenceBatch {
        guard tokens > 0 else { throw .invalid("tokens must be positive, got \(tokens)") }
        let counts = try l.kernel(tokens: tokens).dims.inputCounts(batch: batch)
        try Self.checkScale(gradScale)
        let a = try Self.base(activations, count: counts.activations, "activations")
        let g = try Self.base(outputGrads, count: counts.outputGrads, "output_grads")
        let perToken = l.tokenMode == .perToken
        guard let mask else {
            return perToken ? SequenceBatch(batch: try checkedProduct(batch, tokens, what: "batch × tokens"), tokens: 1,
                                            activations: a, outputGrads: g, copies: nil)
                            : SequenceBatch(batch: batch, tokens: tokens, activations: a, outputGrads: g, copies: nil)
        }
        let positions = try checkedProduct(batch, tokens, what: "batch × tokens")
        let flags = try Self.base(mask, count: positions, "mask")
        var kept = 0
        for i in 0..<positions {
            guard flags[i] <= 1 else { throw .invalid("mask[\(i)] is \(flags[i]); a mask holds 0 (padding) or 1 (token)") }
            kept += Int(flags[i])
        }
        if perToken, kept == 0 { throw .invalid("the mask selects no token (per-token mode needs at least one)") }
        let width = l.dims.inputSize, outWidth = l.dims.outputSize  // one token's features (the layer's own T = 1)
        let rows = perToken ? kept : positions
        let ca = try Storage<Float>(count: try checkedProduct(rows, width, what: "masked activations"), budget: budget, what: "masked activations")
        let cg = try Storage<Float>(count: try checkedProduct(rows, outWidth, what: "masked output gradients"), budget: budget, what: "masked output gradients")
        var r = 0
        for i in 0..<positions {
            if flags[i] == 1 {
                (ca.base + r * width).update(from: a + i * width, count: width)
                (cg.base + r * outWidth).update(from: g + i * outWidth, count: outWidth)
                r += 1
            } else if !perToken {  // padding contributes nothing, whatever it holds
                (ca.base + r * width).update(repeating: 0, count: width)
                (cg.base + r * outWidth).update(repeating: 0, count: outWidth)
                r += 1
            }
        }
        return SequenceBatch(batch: perToken ? kept : batch, tokens: perToken ? 1 : tokens,
                             activations: ca.base, outputGrads: cg.base, copies: (ca, cg))
    }

    /// A computing call (`compute`) on the sequence batch of the caller's arrays: checks them,
    /// refuses `outputs` (weight, bias) that overlap them, and keeps any masked copies alive while
    /// `body` runs.
    private func withSequenceBatch(
        _ l: ExactBlock, batch: Int, tokens: Int, _ activations: UnsafeBufferPointer<Float>,
        _ outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float,
        outputs: ((UnsafeMutablePointer<Float>, Int), (UnsafeMutablePointer<Float>?, Int))?,
        _ body: (SequenceBatch) throws(TENGraDError) -> Void
    ) throws(TENGraDError) {
        try compute { () throws(TENGraDError) in
            let b = try sequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale)
            if let (weight, bias) = outputs {
                // sequenceBatch checked the caller's arrays non-NULL and sized.
                guard let a = activations.baseAddress, let g = outputGrads.baseAddress else { throw .invalid("activations is NULL") }
                try Self.checkNoOverlap(outputs: weight, bias,
                                        inputs: [(a, activations.count, "activations"), (g, outputGrads.count, "output_grads")])
            }
            try withExtendedLifetime(b.copies) { () throws(TENGraDError) in try body(b) }
        }
    }

    /// `updateCurvature` for a linear layer applied over sequences: activations [batch][tokens][in],
    /// output gradients [batch][tokens][out] (PyTorch's batch-first layout), an optional mask
    /// [batch][tokens] of 0 (padding: contributes nothing, whatever its values) and 1. Per
    /// sequence (default), a sample is a sequence: `u_i = s Σ_t g_it ã_itᵀ`, the exact Fisher block
    /// of per-sequence gradients; per token, every unmasked token is a sample. `tokens` may differ
    /// between calls.
    public func updateCurvature(
        layer id: Int, batch: Int, tokens: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float
    ) throws(TENGraDError) {
        let l = try layer(id)
        try withSequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale,
                              outputs: nil) { (b) throws(TENGraDError) in
            try l.updateCurvature(batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads,
                                  scale: gradScale, context: context)
        }
    }

    /// `naturalGradient` for a linear layer over sequences (see the sequence `updateCurvature`).
    public func naturalGradient(
        layer id: Int, batch: Int, tokens: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float,
        weightUpdate: UnsafeMutableBufferPointer<Float>, biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) {
        let l = try layer(id)
        let (wu, bu) = try Self.updateOutputs(l, weightUpdate, biasUpdate)
        try withSequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale,
                              outputs: ((wu, l.dims.weightCount), (bu, l.dims.biasCount))) { (b) throws(TENGraDError) in
            try l.naturalGradient(
                batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads, scale: gradScale,
                weightUpdate: wu, biasUpdate: bu, context: context)
        }
    }

    /// `update = (F + λI)⁻¹ grad` with F from the layer's current snapshot. The update buffers may
    /// be the gradient buffers themselves (in place).
    public func precondition(
        layer id: Int, weightGrad: UnsafeBufferPointer<Float>, biasGrad: UnsafeBufferPointer<Float>?,
        weightUpdate: UnsafeMutableBufferPointer<Float>, biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) {
        let l = try layer(id)
        let w = try Self.base(weightGrad, count: l.dims.weightCount, "weight_grad")
        let b = try Self.bias(biasGrad, count: l.dims.biasCount, "bias_grad")
        let (wu, bu) = try Self.updateOutputs(l, weightUpdate, biasUpdate)
        try compute { () throws(TENGraDError) in
            try l.precondition(weightGrad: w, biasGrad: b, weightUpdate: wu, biasUpdate: bu, context: context)
        }
    }

    /// Empirical Fisher in one call: snapshot from this batch, and the update of this batch's mean
    /// gradient, `(F + λI)⁻¹ (1/m) Σ_i u_i = U (UᵀU + mλI)⁻¹ 1`, written to the update buffers.
    public func naturalGradient(
        layer id: Int, batch: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, gradScale: Float,
        weightUpdate: UnsafeMutableBufferPointer<Float>, biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) {
        try naturalGradient(layer: id, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads,
                            mask: nil, gradScale: gradScale, weightUpdate: weightUpdate, biasUpdate: biasUpdate)
    }

    // MARK: - KL clipping

    /// Forgets every layer's last ⟨update, grad⟩, so the next `klClipFactor` sums only the layers
    /// updated after this call. Call it at the start of a step in which some layers may get no
    /// update (an unused head, a skipped layer): their terms from earlier steps would count.
    public func clearUpdates() {
        for l in layers { l.record.hasUpdate = false }
    }

    /// `ν = min(1, sqrt(κ / (lr² Σ_layers ⟨update, grad⟩)))` over every layer's most recent update;
    /// multiply all updates of the step by ν. 1 when the sum is not positive.
    public func klClipFactor(learningRate: Double, klClip: Double) throws(TENGraDError) -> Double {
        guard learningRate.isFinite, learningRate > 0 else { throw .invalid("learning_rate must be finite and > 0, got \(learningRate)") }
        guard klClip.isFinite, klClip > 0 else { throw .invalid("kl_clip must be finite and > 0, got \(klClip)") }
        var total = 0.0
        for l in layers { total += l.updateDotGrad ?? 0 }
        guard total > 0, total.isFinite else { return 1 }
        return min(1, (klClip / (learningRate * learningRate * total)).squareRoot())
    }
}

// MARK: - Array conveniences

extension Preconditioner {
    /// `updateCurvature` with arrays.
    public func updateCurvature(layer: Int, batch: Int, activations: [Float], outputGrads: [Float], gradScale: Float) throws(TENGraDError) {
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try updateCurvature(layer: layer, batch: batch, activations: a, outputGrads: g, gradScale: gradScale)
            }
        }
    }

    /// `perSampleGradients` with arrays; returns the batch × (weight + bias) rows.
    public func perSampleGradients(layer: Int, batch: Int, activations: [Float], outputGrads: [Float], gradScale: Float) throws(TENGraDError) -> [Float] {
        var rows = [Float](repeating: 0, count: try arrayCounts(layer: layer, batch: batch).perSampleGradients)
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try rows.withUnsafeMutableBufferPointer { (o) throws(TENGraDError) in
                    try perSampleGradients(layer: layer, batch: batch, activations: a, outputGrads: g, gradScale: gradScale, into: o)
                }
            }
        }
        return rows
    }

    /// `updateCurvature` from per-sample gradient rows in an array.
    public func updateCurvature(layer: Int, batch: Int, perSampleGradients rows: [Float]) throws(TENGraDError) {
        try rows.withUnsafeBufferPointer { (u) throws(TENGraDError) in
            try updateCurvature(layer: layer, batch: batch, perSampleGradients: u)
        }
    }

    /// `precondition` with arrays; returns the weight update and the bias update (nil without bias).
    public func precondition(layer: Int, weightGrad: [Float], biasGrad: [Float]?) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        let counts = try arrayCounts(layer: layer, batch: 0)
        var weight = [Float](repeating: 0, count: counts.weight)
        var bias: [Float]? = counts.bias > 0 ? [Float](repeating: 0, count: counts.bias) : nil
        try weightGrad.withUnsafeBufferPointer { (w) throws(TENGraDError) in
            try withOptionalBuffer(biasGrad) { (b) throws(TENGraDError) in
                try weight.withUnsafeMutableBufferPointer { (wu) throws(TENGraDError) in
                    try withOptionalMutableBuffer(&bias) { (bu) throws(TENGraDError) in
                        try precondition(layer: layer, weightGrad: w, biasGrad: b, weightUpdate: wu, biasUpdate: bu)
                    }
                }
            }
        }
        return (weight, bias)
    }

    /// Sequence `updateCurvature` with arrays: activations [batch][tokens][in], mask [batch][tokens] or nil.
    public func updateCurvature(
        layer: Int, batch: Int, tokens: Int, activations: [Float], outputGrads: [Float], mask: [UInt8]?, gradScale: Float
    ) throws(TENGraDError) {
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try withOptionalBuffer(mask) { (k) throws(TENGraDError) in
                    try updateCurvature(layer: layer, batch: batch, tokens: tokens, activations: a, outputGrads: g, mask: k,
                                        gradScale: gradScale)
                }
            }
        }
    }

    /// `naturalGradient` with arrays; returns the weight update and the bias update (nil without bias).
    public func naturalGradient(
        layer: Int, batch: Int, activations: [Float], outputGrads: [Float], gradScale: Float
    ) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        try naturalGradient(layer: layer, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads, mask: nil,
                            gradScale: gradScale)
    }

    /// Sequence `naturalGradient` with arrays (see the sequence `updateCurvature`).
    public func naturalGradient(
        layer: Int, batch: Int, tokens: Int, activations: [Float], outputGrads: [Float], mask: [UInt8]?, gradScale: Float
    ) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        let counts = try arrayCounts(layer: layer, batch: 0)
        var weight = [Float](repeating: 0, count: counts.weight)
        var bias: [Float]? = counts.bias > 0 ? [Float](repeating: 0, count: counts.bias) : nil
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try weight.withUnsafeMutableBufferPointer { (wu) throws(TENGraDError) in
                    try withOptionalMutableBuffer(&bias) { (bu) throws(TENGraDError) in
                        try withOptionalBuffer(mask) { (k) throws(TENGraDError) in
                            try naturalGradient(
                                layer: layer, batch: batch, tokens: tokens, activations: a, outputGrads: g, mask: k,
                                gradScale: gradScale, weightUpdate: wu, biasUpdate: bu)
                        }
                    }
                }
            }
        }
        return (weight, bias)
    }
}

private func withOptionalBuffer<T, R>(
    _ array: [T]?, _ body: (UnsafeBufferPointer<T>?) throws(TENGraDError) -> R
) throws(TENGraDError) -> R {
    guard let array else { return try body(nil) }
    return try array.withUnsafeBufferPointer { (p) throws(TENGraDError) in try body(p) }
}

private func withOptionalMutableBuffer<R>(
    _ array: inout [Float]?, _ body: (UnsafeMutableBufferPointer<Float>?) throws(TENGraDError) -> R
) throws(TENGraDError) -> R {
    guard array != nil else { return try body(nil) }
    return try array!.withUnsafeMutableBufferPointer { (p) throws(TENGraDError) in try body(p) }
}
