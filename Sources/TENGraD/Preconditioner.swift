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

    /// Registers a per-feature scale and shift `y = γ ∘ x̂ (+ β)`, γ and β of `features` numbers:
    /// the affine part of LayerNorm (with β) or RMSNorm (without). Its calls take the normalized
    /// inputs x̂ as activations. Returns its id.
    @discardableResult
    public func addAffine(features: Int, bias: Bool) throws(TENGraDError) -> Int {
        try append(ExactBlock(AffineGeometry(features: features, hasBias: bias)))
    }

    /// Registers a lookup table `y_t = W[id_t]`, `W` of shape [vocabulary][features]
    /// (nn.Embedding; vocabulary ≤ 2²⁴). Its calls take the token ids, as floats, as activations
    /// ([batch][tokens]). Returns its id.
    @discardableResult
    public func addEmbedding(vocabulary: Int, features: Int) throws(TENGraDError) -> Int {
        try append(ExactBlock(EmbeddingGeometry(vocabulary: vocabulary, features: features)))
    }

    /// Forces a convolution's Gram strategy (`.auto`, the default, lets the flop model choose).
    public func setConvStrategy(layer id: Int, _ strategy: ConvStrategy) throws(TENGraDError) {
        // Linear layers take it too: it decides their Gram when called over tokens (T > 1).
        try layer(id).strategySetting = strategy
    }

    /// The Gram-strategy setting of a layer.
    public func convStrategy(layer id: Int) throws(TENGraDError) -> ConvStrategy {
        try layer(id).strategySetting
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
        guard l.geometry.takesTokens || mode == .perSequence else {
            throw .invalid("token modes apply to layers over sequences; layer \(id) is a \(l.geometry.kind) layer")
        }
        l.tokenMode = mode
    }

    public func tokenMode(layer id: Int) throws(TENGraDError) -> TokenMode {
        try layer(id).tokenMode
    }

    /// How a layer reads λ (`DampingMode`: `.absolute`, the default, or `.relative` — λ times the
    /// snapshot's average nonzero eigenvalue tr(F)/min(m, d)). Takes effect at the next curvature update.
    public func setDampingMode(layer id: Int, _ mode: DampingMode) throws(TENGraDError) {
        try layer(id).dampingMode = mode
    }

    public func dampingMode(layer id: Int) throws(TENGraDError) -> DampingMode {
        try layer(id).dampingMode
    }

    /// Sets a layer's diagonal base E (docs/DESIGN.md §13): its block becomes `F + λE` instead of
    /// `F + λI`, one positive number per parameter (each a normal float32: ≥ 2⁻¹²⁶ and finite),
    /// weight in the gradient's layout, bias when the layer has one. nil clears it (λI). Takes
    /// effect at the next curvature update; the current snapshot keeps the base it was taken
    /// with. Layers with a base use the explicit Gram (or a sparse kind's own).
    public func setBase(
        layer id: Int, weightBase: UnsafeBufferPointer<Float>?, biasBase: UnsafeBufferPointer<Float>?
    ) throws(TENGraDError) {
        let l = try layer(id)
        guard let weightBase else {
            guard biasBase == nil else { throw .invalid("bias_base without weight_base") }
            l.baseSetting = nil
            return
        }
        let w = try Arguments.base(weightBase, count: l.dims.weightCount, "weight_base")
        let b = try Arguments.bias(biasBase, count: l.dims.biasCount, "bias_base")
        l.baseSetting = try DiagonalBase(weight: w, weightCount: l.dims.weightCount, bias: b, biasCount: l.dims.biasCount,
                                         budget: budget)
    }

    /// Whether a layer has a diagonal base set (for its next snapshot).
    public func hasBase(layer id: Int) throws(TENGraDError) -> Bool {
        try layer(id).baseSetting != nil
    }

    func append(_ layer: ExactBlock) throws(TENGraDError) -> Int {
        guard layers.count < Int(Int32.max) else { throw .invalid("too many layers") }
        layers.append(layer)
        return layers.count - 1
    }

    func layer(_ id: Int) throws(TENGraDError) -> ExactBlock {
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
        case affine(features: Int, bias: Bool)
        case embedding(vocabulary: Int, features: Int)
    }

    public func layerDescription(layer id: Int) throws(TENGraDError) -> Layer {
        try layer(id).geometry.description
    }

    /// The shapes of a layer's arrays: one sample's (and token's) activations and output
    /// gradients, the weight and the bias (nil: none). Row-major, as the calls take them.
    public struct ArrayShapes: Sendable, Equatable {
        public var activations: [Int]
        public var outputGrads: [Int]
        public var weight: [Int]
        public var bias: [Int]?
    }

    public func arrayShapes(layer id: Int) throws(TENGraDError) -> ArrayShapes {
        try layer(id).geometry.arrayShapes
    }

    /// Diagnostics of one layer.
    public func stats(layer id: Int) throws(TENGraDError) -> LayerStats {
        try layer(id).stats
    }

    // MARK: - Computing calls (the entry points: Preconditioner+Batches.swift)

    var context: LayerContext { LayerContext(damping: damping, budget: budget, workspace: workspace) }

    /// Runs a computing call with the handle's BLAS threads; if it fails, the workspace goes back
    /// to its size before the call, so a failed call changes nothing, memory in use included.
    func compute(_ body: () throws(TENGraDError) -> Void) throws(TENGraDError) {
        let mark = workspace.mark
        do {
            try BLAS.withThreads(blasThreads, body)
        } catch {
            workspace.restore(mark)
            throw error
        }
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
        return try DataParallel.klClipFactor(learningRate: learningRate, klClip: klClip, sum: total.isNaN ? 0 : total)
    }
}
