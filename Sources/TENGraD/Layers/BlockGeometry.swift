/// How a layer kind presents its samples to the block kernel (docs/DESIGN.md §3).
///
/// Every layer kind is "patches × positions": per sample i and group γ there is a patch matrix
/// Ĩ_iγ (P features × L positions) and an output-gradient matrix G_iγ (C_out/groups features × L
/// positions), and the per-sample gradient is
///
///     u_i = s · (Σ_l G_iγ[:, l] Ĩ_iγ[:, l]ᵀ)_γ        (a bias adds a feature that is always 1)
///
/// * linear layer: L = 1, Ĩ_i = a_i, a view of the caller's activations (no copy);
/// * linear layer over T tokens: L = T, Ĩ_i = A_iᵀ, again a view;
/// * convolution: Ĩ_iγ = im2col of the sample's input restricted to group γ, unfolded on demand.
///
/// A kind conforms by stating its `BlockDims` and producing the patch matrix of a range of
/// samples; the kernel (`BlockKernel`) does all the mathematics once for every kind.
///
/// Everything a kind is — its description, sizes, capabilities and state codec — is stated by its
/// geometry, and the kind is registered once, in `LayerKind.geometries`.
protocol BlockGeometry: Sendable {
    static var kind: LayerKind { get }
    var dims: BlockDims { get }
    /// The public description of the layer (kind and shape).
    var description: Preconditioner.Layer { get }
    /// The shapes of its calls' arrays (per sample and token; weight and bias whole): the one
    /// size authority the bindings ask.
    var arrayShapes: Preconditioner.ArrayShapes { get }
    /// Tokens per sample of a layer over sequences (`overTokens`); 1 for every other call.
    var tokens: Int { get }
    /// Whether the kind is applied over token sequences (inputs [batch][tokens][...]), with
    /// masks and token modes.
    var takesTokens: Bool { get }
    /// The same layer applied over `tokens` positions per sample; kinds without tokens refuse.
    func overTokens(_ tokens: Int) throws(TENGraDError) -> any BlockGeometry
    /// Whether the Gram strategy is a choice worth reporting in the stats for every call (it is
    /// for any kind called over tokens, T > 1).
    var reportsStrategy: Bool { get }
    /// What the `.auto` settings resolve to when the kind has a fixed answer (`.auto`: the cost
    /// models decide).
    var defaultStrategy: ConvStrategy { get }
    var defaultRepresentation: SnapshotRepresentation { get }
    /// Writes whole rows (weight then bias, unscaled) of the per-sample gradients of samples
    /// `start..<start+count` into `u + i·ldu` and returns true; or returns false to let the
    /// kernel form them group by group.
    func formRows(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int
    ) -> Bool
    /// Refuses activations the kind cannot take beyond NaN and Inf (an embedding's token ids:
    /// integers in range), before anything reads them as indices.
    func checkActivations(_ a: UnsafePointer<Float>, count: Int) throws(TENGraDError)
    /// A bound on |patch entries| given max |activation| (one-hot patches: 1).
    func patchBound(maxActivation: Float) -> Float
    /// The kind's number in saved state, and its shape's codec (docs: Preconditioner+State).
    static var stateCode: UInt32 { get }
    func writeShape(_ w: inout StateWriter)
    static func readShape(_ r: inout StateReader) throws(TENGraDError) -> any BlockGeometry
    /// Floats of scratch `patches` needs for `count` samples (0 when the patches are a view).
    func patchScratch(samples count: Int) -> Int
    /// The patch matrix (P features × count·L positions, samples side by side) of samples
    /// `start..<start+count` for group `group`: a view of the activations `a`, or unfolded into
    /// `scratch`. Its layout is `dims.positionMajor`.
    func patches(
        _ a: UnsafePointer<Float>, start: Int, count: Int, group: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Block
    /// Floats of scratch the per-sample gradients of `count` samples need (`formWeightGradients`
    /// or the unfolding); at least `patchScratch`'s when the kind unfolds.
    func formScratch(samples count: Int) -> Int
    /// Samples per chunk its own formation wants at least (batched products); 1 when any do.
    var formChunkFloor: Int { get }
    /// Writes the weight part (n × P per sample, the weight's order) of the per-sample gradients
    /// of samples `start..<start+count`, output features `o0..<o0+n` of group `group`, to
    /// `u + i·ldu + column`, and returns true; or returns false to let the kernel unfold the
    /// patches and multiply. `scratch` holds `formScratch(samples: count)` floats.
    func formWeightGradients(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int, group: Int, o0: Int, n: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int, column: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Bool
    /// Scales a block that `formWeightGradients` wrote (m rows from `u`, row stride ldu) by a
    /// diagonal base's e^{-1/2}, column by column in the block's own order.
    func scaleWeightBlock(
        _ u: UnsafeMutablePointer<Float>, rows m: Int, ldu: Int, group: Int, o0: Int, n: Int, base: DiagonalBase)
}

extension BlockGeometry {
    var kind: LayerKind { Self.kind }
    var reportsStrategy: Bool { false }
    var defaultStrategy: ConvStrategy { .auto }
    var defaultRepresentation: SnapshotRepresentation { .auto }
    func formRows(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int
    ) -> Bool { false }
    func checkActivations(_ a: UnsafePointer<Float>, count: Int) throws(TENGraDError) {}
    func patchBound(maxActivation: Float) -> Float { maxActivation }
    func formScratch(samples count: Int) -> Int { patchScratch(samples: count) }
    var formChunkFloor: Int { 1 }
    func formWeightGradients(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int, group: Int, o0: Int, n: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int, column: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Bool { false }
    /// The weight's order: features o0..<o0+n of group γ are n·P consecutive parameters.
    func scaleWeightBlock(
        _ u: UnsafeMutablePointer<Float>, rows m: Int, ldu: Int, group: Int, o0: Int, n: Int, base: DiagonalBase
    ) {
        base.scaleRows(u, rows: m, width: n * dims.patch, ldu: ldu, column: (group * dims.groupOut + o0) * dims.patch)
    }
}

/// A kind whose per-sample gradient rows are sparse (an embedding's: the rows of the ids a sample
/// holds): its products over the raw batch are gathers and scatters, which replace the kernel's
/// patch GEMMs (the factored Gram, Uᵀv and U x of raw snapshots). Unscaled Gram, like the kernel's.
protocol SparseRowGeometry: BlockGeometry {
    func sparseGramScratch(samples m: Int) throws(TENGraDError) -> Int
    /// K += the Gram of the batch's rows (unscaled; with a base, of the rows ⊙ e^{-1/2}).
    /// Returns the flops.
    func sparseGram(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into k: UnsafeMutablePointer<Double>,
        work: UnsafeMutablePointer<Float>, base: DiagonalBase?
    ) -> Double
    /// t_i = s ⟨u_i, v⟩. Returns the flops.
    func sparseProject(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Double, weightGrad: UnsafePointer<Float>,
        into t: UnsafeMutablePointer<Double>
    ) -> Double
    /// weight ← β weight + α s Σ_i x_i u_i (β = 0 overwrites). Returns the flops.
    func sparseApply(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Double, x: UnsafePointer<Double>,
        alpha: Double, beta: Float, weight: UnsafeMutablePointer<Float>
    ) -> Double
}

/// Sizes of a layer seen as patches × positions. Built by the geometries with every product
/// overflow-checked and every BLAS dimension within 32 bits, so the kernel uses plain arithmetic.
struct BlockDims: Sendable, Equatable {
    let groups: Int
    /// P: patch features per group, without the bias feature.
    let patch: Int
    /// C_out / groups: output features per group.
    let groupOut: Int
    /// L: positions per sample.
    let positions: Int
    let hasBias: Bool
    /// Floats of one sample's activations and of its output gradients.
    let inputSize: Int
    let outputSize: Int
    /// Storage order of patches and output gradients: position-major ([L][features] per sample:
    /// linear layers, PyTorch's batch-first token tensors) or channel-major ([features][L]:
    /// convolutions' NCHW).
    let positionMajor: Bool
    let weightCount: Int
    let biasCount: Int
    /// d = weight + bias numbers: the length of a per-sample gradient.
    let parameters: Int

    init(
        groups: Int, patch: Int, groupOut: Int, positions: Int, hasBias: Bool, inputSize: Int, outputSize: Int,
        positionMajor: Bool
    ) throws(TENGraDError) {
        self.groups = groups
        self.patch = patch
        self.groupOut = groupOut
        self.positions = positions
        self.hasBias = hasBias
        self.inputSize = inputSize
        self.outputSize = outputSize
        self.positionMajor = positionMajor
        let outChannels = try checkedProduct(groups, groupOut, what: "output features")
        weightCount = try checkedProduct(outChannels, patch, what: "weight size")
        biasCount = hasBias ? outChannels : 0
        parameters = try checkedSum(weightCount, biasCount, what: "parameter count")
        // Every matrix handed to BLAS: a patch block of one sample, a gradient block, the weight.
        let patchFeatures = try checkedSum(patch, 1, what: "patch features")
        _ = try checkedProduct(patchFeatures, max(positions, outChannels), what: "patch matrix size")
        for (value, name) in [(patchFeatures, "patch features"), (positions, "positions"), (outChannels, "output features"),
                              (inputSize, "input size"), (outputSize, "output size"), (parameters, "parameter count")]
        where value > BLAS.maxDimension {
            throw .shape("\(name) \(value) exceeds \(BLAS.maxDimension) (32-bit BLAS)")
        }
    }

    var outChannels: Int { groups * groupOut }
    /// P̃ = P (+ 1 with a bias).
    var patchWithBias: Int { patch + (hasBias ? 1 : 0) }

    /// Overflow-checked element counts of a batch's activations and output gradients.
    func inputCounts(batch: Int) throws(TENGraDError) -> (activations: Int, outputGrads: Int) {
        guard batch > 0 else { throw .invalid("batch must be positive, got \(batch)") }
        guard batch <= BLAS.maxDimension else { throw .shape("batch \(batch) exceeds \(BLAS.maxDimension) (32-bit BLAS)") }
        return (
            try checkedProduct(batch, inputSize, what: "batch × activations per sample"),
            try checkedProduct(batch, outputSize, what: "batch × output gradients per sample")
        )
    }
}

/// A features × positions matrix view, stored position-major (element (f, q) at
/// `base[q·ld + f]`) or channel-major (`base[f·ld + q]`).
struct Block {
    let base: UnsafePointer<Float>
    let ld: Int
    let positionMajor: Bool

    /// The view starting at position `q` (e.g. one sample inside a chunk).
    @inline(__always) func from(position q: Int) -> Block {
        Block(base: base + (positionMajor ? q * ld : q), ld: ld, positionMajor: positionMajor)
    }
    /// The view starting at feature `f` (e.g. one channel block inside a group).
    @inline(__always) func from(feature f: Int) -> Block {
        Block(base: base + (positionMajor ? f : f * ld), ld: ld, positionMajor: positionMajor)
    }
}
