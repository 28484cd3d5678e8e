/// What every layer kind provides to the preconditioner. Implementations hold the layer's shape
/// and its current curvature snapshot and do all of that layer's mathematics.
protocol PreconditionedLayer: AnyObject {
    var kind: LayerKind { get }
    /// Numbers in the weight gradient.
    var weightCount: Int { get }
    /// Numbers in the bias gradient; 0 when the layer has no bias.
    var biasCount: Int { get }
    /// Element counts of the activations and output gradients of a batch (overflow-checked).
    func inputCounts(batch: Int) throws(TENGraDError) -> (activations: Int, outputGrads: Int)
    /// Statistics of the current snapshot and the last calls.
    var stats: LayerStats { get }

    func updateCurvature(
        batch: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>,
        scale: Float, context: LayerContext) throws(TENGraDError)

    func precondition(
        weightGrad: UnsafePointer<Float>, biasGrad: UnsafePointer<Float>?,
        weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext) throws(TENGraDError)

    func naturalGradient(
        batch: Int, activations: UnsafePointer<Float>, outputGrads: UnsafePointer<Float>,
        scale: Float, weightUpdate: UnsafeMutablePointer<Float>, biasUpdate: UnsafeMutablePointer<Float>?,
        context: LayerContext) throws(TENGraDError)
}

/// Settings and shared resources a layer needs during one call.
struct LayerContext {
    let damping: Double
    let budget: MemoryBudget
    let workspace: Workspace
}

public enum LayerKind: Int32, Sendable {
    case linear = 1
    case conv2d = 2
}

/// Which exact Gram strategy a convolution uses (SPEC §2); linear layers report `.none`.
public enum ConvStrategy: Int32, Sendable {
    case none = 0
    case factored = 1
    case explicit = 2
}

/// Diagnostics of one layer (mirrors `tengrad_layer_stats`).
public struct LayerStats: Sendable, Equatable {
    public var kind: LayerKind
    public var convStrategy: ConvStrategy = .none
    /// m of the current snapshot; 0 before the first.
    public var batch: Int = 0
    /// Numbers in weight (+ bias).
    public var parameters: Int
    public var snapshotBytes: Int = 0
    public var workspaceBytes: Int = 0
    /// λ of the current factorization.
    public var damping: Double = 0
    /// Diagonal jitter the last factorization needed (0 almost always).
    public var jitter: Double = 0
    /// LAPACK's reciprocal 1-norm condition estimate of K + (mλ + jitter) I.
    public var rcond: Double = 0
    public var curvatureFlops: Double = 0
    public var curvatureSeconds: Double = 0
    public var updateFlops: Double = 0
    public var updateSeconds: Double = 0
    /// ⟨update, grad⟩ of the last precondition or natural-gradient call (KL clipping).
    public var updateDotGrad: Double = 0
    /// Whether `updateDotGrad` holds a value.
    public var hasUpdate: Bool = false
}

/// One pass over an input array: is every entry finite, its largest magnitude, its squared norm.
/// Vectorized (16 lanes) because it reads every gradient once more than the GEMMs do; squares are
/// summed in float32 over blocks of 4096 entries and the block sums in float64.
struct ArrayScan {
    var finite = true
    var maxAbs: Float = 0
    var sumSquares: Double = 0

    init(_ p: UnsafePointer<Float>, count: Int) {
        typealias V = SIMD16<Float>
        var poison = V()  // stays 0 unless some entry is NaN or ±Inf (x·0 is NaN then)
        var high = V(), low = V()
        var total = 0.0
        var i = 0
        let vectorEnd = count - count % V.scalarCount
        let raw = UnsafeRawPointer(p)
        while i < vectorEnd {
            let blockEnd = min(vectorEnd, i + 4096)
            var squares = V()
            while i < blockEnd {
                let x = raw.loadUnaligned(fromByteOffset: i * 4, as: V.self)
                poison += x * 0
                high = pointwiseMax(high, x)
                low = pointwiseMin(low, x)
                squares += x * x
                i += V.scalarCount
            }
            total += Double(squares.sum())
        }
        var finite = !(poison.sum() != 0 || poison.sum().isNaN)
        var maxAbs = max(high.max(), -low.min())
        while i < count {
            let x = p[i]
            finite = finite && x.isFinite
            maxAbs = max(maxAbs, abs(x))
            total += Double(x) * Double(x)
            i += 1
        }
        self.finite = finite && maxAbs.isFinite
        self.maxAbs = maxAbs
        self.sumSquares = total
    }
}

/// Updates are guaranteed finite when an a-priori bound on their magnitude stays below this:
/// a quarter of float32's largest value leaves room for rounding in the GEMM's partial sums.
let safeMagnitude = Double(Float.greatestFiniteMagnitude) / 4
