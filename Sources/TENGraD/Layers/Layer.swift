/// Settings and shared resources a layer needs during one call.
struct LayerContext {
    let damping: Double
    let budget: MemoryBudget
    let workspace: Workspace
}

public enum LayerKind: Sendable, Equatable {
    case linear
    case conv2d
    /// A per-feature scale and shift (the affine part of LayerNorm, RMSNorm).
    case affine
    /// A lookup table over token ids (nn.Embedding).
    case embedding

    /// Every kind's geometry, registered once: saved state finds a kind's codec here.
    static let geometries: [any BlockGeometry.Type] = [
        LinearGeometry.self, Conv2dGeometry.self, AffineGeometry.self, EmbeddingGeometry.self,
    ]
}

/// How a layer's λ is meant (docs/DESIGN.md §16): as given, or relative to its Fisher block's
/// average eigenvalue.
public enum DampingMode: Sendable, Equatable {
    /// λ as set (default).
    case absolute
    /// λ times the snapshot's average nonzero eigenvalue, tr(F)/min(m, d) (with a diagonal base,
    /// of E⁻¹F), so one λ fits layers and losses of any scale; λ itself when F is zero.
    case relative
}

/// Which exact Gram strategy a layer uses (docs/DESIGN.md §3). As a setting, `.auto` lets the
/// flop model choose; in `LayerStats`, `.auto` means "not a convolution".
public enum ConvStrategy: Sendable, Equatable {
    case auto
    /// Pairwise patch and gradient products over positions: cheap when L is small.
    case factored
    /// Per-sample gradients formed, then their Gram: cheap when L is large.
    case explicit
}

/// Diagnostics of one layer (mirrors `tengrad_layer_stats`).
public struct LayerStats: Sendable, Equatable {
    public var kind: LayerKind
    /// Strategy the last convolution Gram used; `.auto` for linear layers.
    public var convStrategy: ConvStrategy = .auto
    /// Flop-model estimates of both conv strategies for the last snapshot (0 for linear layers).
    public var factoredFlopsEstimate: Double = 0
    public var explicitFlopsEstimate: Double = 0
    /// m of the current snapshot; 0 before the first.
    public var batch: Int = 0
    /// Numbers in weight (+ bias).
    public var parameters: Int
    public var snapshotBytes: Int = 0
    /// Representation of the current snapshot (`.auto`: no snapshot yet).
    public var representation: SnapshotRepresentation = .auto
    /// Bytes of that representation (batch copies or U), without the m×m system.
    public var representationBytes: Int = 0
    /// The representation cost model for the current snapshot's batch: bytes and reuse-step
    /// cost (flop-equivalents) of either representation (0 before the first snapshot).
    public var rawBytesEstimate: Double = 0
    public var perSampleBytesEstimate: Double = 0
    public var rawReuseCost: Double = 0
    public var perSampleReuseCost: Double = 0
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

/// One pass over an input array: is every entry finite, and its largest magnitude.
///
/// Works on the IEEE bit patterns: with the sign bit cleared, finite floats order like their
/// unsigned integers and every NaN or ±Inf is ≥ 0x7F80_0000, so one integer max-reduction (which
/// the compiler vectorizes, unlike a float one) answers both questions.
struct ArrayScan {
    let finite: Bool
    let maxAbs: Float

    init(_ p: UnsafePointer<Float>, count: Int) {
        // Sixteen lanes at a time (explicit SIMD: the scalar loop was not vectorized), then the tail.
        let raw = UnsafeRawPointer(p)
        let mask = SIMD16<UInt32>(repeating: 0x7FFF_FFFF)
        var lanes = SIMD16<UInt32>(repeating: 0)
        var i = 0
        while i + 16 <= count {
            let v = raw.loadUnaligned(fromByteOffset: 4 * i, as: SIMD16<UInt32>.self) & mask
            lanes.replace(with: v, where: v .> lanes)
            i += 16
        }
        var high = lanes.max()
        let bits = raw.assumingMemoryBound(to: UInt32.self)
        while i < count {
            high = max(high, bits[i] & 0x7FFF_FFFF)
            i += 1
        }
        finite = high < 0x7F80_0000
        maxAbs = finite ? Float(bitPattern: high) : .infinity
    }
}

/// A gradient's finiteness, a bound on its largest magnitude, and its squared norm, in one pass:
/// the float64 sum of exact squares (`Reduce.sumOfSquares`) is finite exactly when every entry
/// is, and then max|v| ≤ ‖v‖.
struct GradientScan {
    let finite: Bool
    let maxAbs: Double
    let sumSquares: Double

    init(_ p: UnsafePointer<Float>, count: Int) {
        // Per half (`inHalves`; one part on one thread), on the stack: no allocation per call.
        let sum = withUnsafeTemporaryAllocation(of: Double.self, capacity: 2) { sums in
            let out = sums.baseAddress!
            out.initialize(repeating: 0, count: 2)
            inHalves(count) { part, range in out[part] = Reduce.sumOfSquares(p + range.lowerBound, range.count) }
            return out[0] + out[1]
        }
        self.init(sumOfSquares: sum)
    }

    /// From a sum of squares computed elsewhere (the fused linear kernels' first product).
    init(sumOfSquares sum: Double) {
        finite = sum.isFinite
        maxAbs = finite ? sum.squareRoot() : .infinity
        sumSquares = finite ? sum : 0
    }

    static let empty = GradientScan()
    private init() {
        finite = true
        maxAbs = 0
        sumSquares = 0
    }
}

/// Updates are guaranteed finite when an a-priori bound on their magnitude stays below this:
/// a quarter of float32's largest value leaves room for rounding in the GEMM's partial sums.
let safeMagnitude = Double(Float.greatestFiniteMagnitude) / 4
