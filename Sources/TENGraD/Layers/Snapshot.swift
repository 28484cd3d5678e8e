/// What a curvature snapshot keeps to apply `(F + λI)⁻¹` to later gradients (docs/DESIGN.md §4).
/// As a setting, `.auto` lets the cost model choose per layer and refresh; in `LayerStats`,
/// `.auto` means "no snapshot yet".
public enum SnapshotRepresentation: Sendable, Equatable {
    case auto
    /// Copies of the batch (activations and output gradients): Uᵀv and U x are recomputed from
    /// them (convolutions unfold again). m·(inputs + outputs) numbers.
    case raw
    /// The per-sample gradients U themselves (m × d float32, rows [weight | bias]): Uᵀv and U x
    /// are one matrix-vector product each. m·d numbers.
    case perSample
}

/// How a linear layer applied over token sequences (inputs [batch][T][in]) defines its samples
/// (docs/DESIGN.md §12).
public enum TokenMode: Sendable, Equatable {
    /// Exact per-sequence blocks (default): a sequence is one sample, its gradient the sum over its
    /// tokens, `u_i = s Σ_t g_it ã_itᵀ`.
    case perSequence
    /// Every unmasked token is a sample (the "expand" view of KFAC libraries, for losses that are
    /// sums over tokens): the same as the plain linear layer on the tokens flattened into the batch.
    case perToken
}

/// A layer's curvature snapshot: its data in one of the two representations and the factorized
/// m×m system. A value: a new damping or a refresh makes a new snapshot that is installed whole.
struct Snapshot {
    enum Data {
        case raw(activations: Storage<Float>, outputGrads: Storage<Float>)
        /// U unscaled (s is applied in float64): m rows of d = weight + bias numbers.
        case perSample(Storage<Float>)
    }

    let m: Int
    /// Positions per sample of the batch (tokens of a linear layer over sequences; 1 otherwise):
    /// the kernel a raw snapshot's reuse products need.
    let tokens: Int
    /// s, the caller's grad_scale of the batch.
    let scale: Float
    let data: Data
    /// A bound on every |entry of U| (s included), for the a-priori float32 overflow check of
    /// updates: |(U x)_k| ≤ entryBound · Σ|x_i|.
    let entryBound: Double
    let system: DampedSystem
    /// The diagonal base its Gram used (nil: λI), which its products then use too.
    var base: DiagonalBase? = nil
    /// The factor λ is multiplied by for this snapshot: 1 (absolute damping), or the batch
    /// block's average nonzero eigenvalue tr(F)/min(m, d) = tr(K)/(m·min(m, d)) (relative; K the
    /// Gram its system holds). A new λ re-factorizes with λ · dampingScale.
    var dampingScale: Double = 1

    /// tr(K)/(m·min(m, d)) of a Gram (s² applied), or 1 when it is 0: the relative damping's factor.
    static func relativeScale(_ gram: Storage<Double>, m: Int, parameters d: Int) -> Double {
        var trace = 0.0
        for i in 0..<m { trace += gram.base[i * m + i] }
        let scale = trace / (Double(m) * Double(min(m, d)))
        return scale > 0 && scale.isFinite ? scale : 1
    }

    var representation: SnapshotRepresentation {
        if case .raw = data { return .raw }
        return .perSample
    }

    /// Bytes of the representation (without the m×m system).
    var dataBytes: Int {
        switch data {
        case let .raw(a, g): return a.bytes + g.bytes
        case let .perSample(u): return u.bytes
        }
    }

    var bytes: Int { dataBytes + system.bytes }

    func with(system newSystem: DampedSystem) -> Snapshot {
        Snapshot(m: m, tokens: tokens, scale: scale, data: data, entryBound: entryBound, system: newSystem, base: base,
                 dampingScale: dampingScale)
    }

    /// The entry bound of a raw snapshot: an entry of u_i sums L products g·ã, so
    /// |u_ik| ≤ s · L · max|g| · max|ã| (max|ã| counts the bias's 1; the geometry's
    /// `patchBound` of the activations' largest magnitude).
    static func rawEntryBound(scale: Float, dims: BlockDims, maxPatch: Float, maxOutputGrad: Float) -> Double {
        let maxA = max(Double(maxPatch), dims.hasBias ? 1 : 0)
        return Double(scale) * Double(dims.positions) * Double(maxOutputGrad) * maxA
    }
}

/// The cost model that picks a snapshot's representation (docs/DESIGN.md §4), in flop-equivalents
/// of one reuse step (`precondition`: Uᵀv then U x):
///
///     raw:         2 · 2·m·L·C_out·P̃ flops of GEMM (unfolding comes on top)
///     per-sample:  2 passes over m·d floats, memory-bound GEMV: 2·m·d · streamCost
///
/// `streamCost` = 20 flop-equivalents per float streamed from memory (OpenBLAS sgemm runs at
/// ~100 GFLOP/s per core here, a GEMV streams ~5 Gfloat/s), so per-sample wins when L ≳ 10 and
/// never for a linear layer (L = 1, where U is also out·(in+1) numbers instead of in + out).
/// Keeping U costs no extra flops when the explicit Gram forms it anyway.
struct RepresentationModel: Equatable {
    static let streamCost = 20.0
    /// With no memory limit, `.auto` keeps U only up to this many bytes per layer (1 GiB), so a
    /// large network cannot exhaust the host by default. A memory limit replaces this cap.
    static let defaultPerSampleCap = 1 << 30

    let rawBytes: Double
    let perSampleBytes: Double
    let rawReuseCost: Double
    let perSampleReuseCost: Double

    init(dims: BlockDims, batch m: Int) {
        let dm = Double(m)
        rawBytes = 4 * dm * Double(dims.inputSize + dims.outputSize)
        perSampleBytes = 4 * dm * Double(dims.parameters)
        rawReuseCost = 4 * dm * Double(dims.positions) * Double(dims.outChannels) * Double(dims.patchWithBias)
        perSampleReuseCost = 2 * dm * Double(dims.parameters) * RepresentationModel.streamCost
    }

    /// The model's pick, given the memory limit (0 = none).
    func pick(memoryLimit: Int) -> SnapshotRepresentation {
        let cap = memoryLimit > 0 ? Double(memoryLimit) : Double(RepresentationModel.defaultPerSampleCap)
        return perSampleReuseCost < rawReuseCost && perSampleBytes <= cap ? .perSample : .raw
    }
}
