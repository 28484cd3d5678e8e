/// A layer's diagonal base (docs/DESIGN.md §13): the block's damping `λI` becomes `λE`,
/// `E = diag(e)` with one positive number per parameter ([weight | bias], the layout of a
/// per-sample row), so the block is `F + λE` and Woodbury still needs one m×m system:
///
///     (F + λE)⁻¹ v = (1/λ) E⁻¹ (v − U x),   x = (K̃ + mλI)⁻¹ Uᵀ E⁻¹ v,   K̃ = Uᵀ E⁻¹ U
///     natural gradient:  (F + λE)⁻¹ (1/m) U 1 = E⁻¹ U (K̃ + mλI)⁻¹ 1
///
/// (U here d × m, per-sample gradients as columns.) λ stays a shift of the m×m system, so a new
/// damping re-factorizes from the kept Gram as before; e = 1 is the plain block. E carries what
/// one batch lacks, curvature memory across batches (e.g. Adam's second moment, normalized): in
/// the directions the batch's gradients do not span, the update is `v / (λe)`.
///
/// A base is immutable: a new one is a new value, and a snapshot keeps the base its Gram used.
struct DiagonalBase {
    /// e, `parameters` floats, each a normal positive float32 (so 1/e is finite).
    let scale: Storage<Float>
    /// e^{-1/2}, for the Gram's rows.
    let inverseRoot: Storage<Float>
    let largest: Float
    let smallest: Float

    /// Copies and checks e (weight part, then the bias part when the layer has one).
    init(weight: UnsafePointer<Float>, weightCount: Int, bias: UnsafePointer<Float>?, biasCount: Int,
         budget: MemoryBudget) throws(TENGraDError) {
        func check(_ p: UnsafePointer<Float>, _ n: Int, _ name: String) throws(TENGraDError) -> (Float, Float) {
            if let range = Self.range(p, count: n) { return range }
            // Refused: a second pass only to say why.
            guard ArrayScan(p, count: n).finite else { throw TENGraDError(.notFinite, "\(name) contains NaN or Inf") }
            throw .invalid("\(name) has an entry below \(Float.leastNormalMagnitude): a base must be positive")
        }
        var (low, high) = try check(weight, weightCount, "weight_base")
        if let bias {
            let (l, h) = try check(bias, biasCount, "bias_base")
            (low, high) = (min(low, l), max(high, h))
        }
        let total = try checkedSum(weightCount, biasCount, what: "parameters")
        scale = try Storage<Float>(count: total, budget: budget, what: "diagonal base (\(total) floats)")
        scale.base.update(from: weight, count: weightCount)
        if let bias { (scale.base + weightCount).update(from: bias, count: biasCount) }
        inverseRoot = try Self.inverseRoots(scale, budget: budget)
        (smallest, largest) = (low, high)
    }

    /// A base restored from saved state; nil when an entry is not a normal positive float.
    init?(restoring scale: Storage<Float>, budget: MemoryBudget) throws(TENGraDError) {
        guard let (low, high) = Self.range(scale.base, count: scale.count) else { return nil }
        self.scale = scale
        inverseRoot = try Self.inverseRoots(scale, budget: budget)
        (smallest, largest) = (low, high)
    }

    private static func inverseRoots(_ e: Storage<Float>, budget: MemoryBudget) throws(TENGraDError) -> Storage<Float> {
        let r = try Storage<Float>(count: e.count, budget: budget, what: "diagonal base (\(e.count) floats)")
        for k in 0..<e.count { r.base[k] = 1 / e.base[k].squareRoot() }
        return r
    }

    var count: Int { scale.count }
    var bytes: Int { scale.bytes + inverseRoot.bytes }

    /// The smallest and largest entry when every entry is a normal positive finite float (nil
    /// otherwise; NaN fails every comparison). Empty arrays give (1, 1).
    static func range(_ p: UnsafePointer<Float>, count: Int) -> (Float, Float)? {
        var low: Float = count == 0 ? 1 : .infinity, high: Float = count == 0 ? 1 : 0
        for i in 0..<count {
            let x = p[i]
            guard x >= Float.leastNormalMagnitude, x <= Float.greatestFiniteMagnitude else { return nil }
            low = min(low, x)
            high = max(high, x)
        }
        return (low, high)
    }

    /// Row i of `u` (m rows, row stride ldu, `width` columns from parameter `column`) ← u ⊙ e^{-1/2}.
    func scaleRows(_ u: UnsafeMutablePointer<Float>, rows m: Int, width: Int, ldu: Int, column: Int) {
        let r = inverseRoot.base + column
        for i in 0..<m {
            let row = u + i * ldu
            for k in 0..<width { row[k] *= r[k] }
        }
    }

    /// out ← v ⊙ e⁻¹ over `count` entries from parameter `column`; returns Σ v²/e.
    func divide(_ v: UnsafePointer<Float>, count: Int, column: Int, into out: UnsafeMutablePointer<Float>) -> Double {
        let e = scale.base + column
        var sum = 0.0
        for k in 0..<count {
            let q = v[k] / e[k]
            out[k] = q
            sum += Double(q) * Double(v[k])
        }
        return sum
    }

    /// x ← x ⊙ (c / e) over `count` entries from parameter `column`.
    func divide(_ x: UnsafeMutablePointer<Float>, count: Int, column: Int, times c: Float) {
        let e = scale.base + column
        for k in 0..<count { x[k] = c * x[k] / e[k] }
    }
}
