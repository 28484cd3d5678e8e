/// The m×m Woodbury system of one curvature snapshot: the Gram `K = UᵀU` of the per-sample
/// gradients (kept, so a new damping re-factorizes without new data) and the Cholesky factor of
///
///     K + (mλ + jitter) I
///
/// in float64. `K + mλI` is symmetric positive definite for every λ > 0 in exact arithmetic; in
/// floating point its smallest eigenvalue can round away when mλ is tiny next to ‖K‖, so a failed
/// factorization is retried with a growing diagonal jitter (relative to the largest diagonal
/// entry, 1e-15 up to 1e-6) before giving up with `.numerical`.
///
/// A system is immutable: a new λ makes a new system sharing the Gram (`refactored`), which the
/// caller installs only once everything else in its call has succeeded (docs/DESIGN.md §6).
final class DampedSystem {
    let m: Int
    /// K = UᵀU, full symmetric, m×m (layout-independent).
    let gram: Storage<Double>
    let factor: Storage<Double>
    let damping: Double
    let jitter: Double
    private var cachedRcond: Double?
    private var cachedAnorm: Double?

    /// Factorizes `gram + mλI`. `gram` must be symmetric and finite.
    init(gram: Storage<Double>, m: Int, damping: Double, budget: MemoryBudget) throws(TENGraDError) {
        self.m = m
        self.gram = gram
        let (factor, jitter) = try DampedSystem.factorize(gram: gram, m: m, damping: damping, budget: budget)
        self.factor = factor
        self.damping = damping
        self.jitter = jitter
    }

    /// A system restored from saved state (see Preconditioner+State), factor included, so a
    /// resumed run computes bit-identical updates.
    init(restoring gram: Storage<Double>, factor: Storage<Double>, m: Int, damping: Double, jitter: Double, anorm: Double?) {
        self.m = m
        self.gram = gram
        self.factor = factor
        self.damping = damping
        self.jitter = jitter
        cachedAnorm = anorm
    }

    /// 1-norm of the factorized matrix K + (mλ + jitter) I, for the condition estimate: computed
    /// from the kept Gram on first request (only diagnostics and saved state need it). In the
    /// factorization it was a serial float64 sum over all m² entries: 0.3 ms of a 256², m = 512
    /// refresh of 4–6 ms.
    var anorm: Double {
        if let cachedAnorm { return cachedAnorm }
        let k = gram.base, diagonal = Double(m) * damping + jitter
        var norm = 0.0
        for j in 0..<m {
            var column = 0.0
            for i in 0..<m {
                var v = k[j * m + i]
                if i == j { v += diagonal }
                column += abs(v)
            }
            norm = max(norm, column)
        }
        cachedAnorm = norm
        return norm
    }

    /// LAPACK's reciprocal 1-norm condition estimate of the factorized matrix; computed on first
    /// request (it costs about as much as a small factorization, and only diagnostics need it).
    var rcond: Double {
        if let cachedRcond { return cachedRcond }
        let r = BLAS.choleskyRcond(n: m, factor: factor.base, anorm: anorm)
        cachedRcond = r
        return r
    }

    /// This system for λ = `newDamping`: itself when unchanged, else a new factorization of the
    /// same kept Gram (nothing of this system changes).
    func refactored(damping newDamping: Double, budget: MemoryBudget) throws(TENGraDError) -> DampedSystem {
        if newDamping == damping { return self }
        let (f, j) = try DampedSystem.factorize(gram: gram, m: m, damping: newDamping, budget: budget)
        return DampedSystem(restoring: gram, factor: f, m: m, damping: newDamping, jitter: j, anorm: nil)
    }

    /// x ← (K + (mλ + jitter) I)⁻¹ x for `nrhs` column-major right-hand sides of length m.
    func solve(_ x: UnsafeMutablePointer<Double>, nrhs: Int = 1) {
        BLAS.choleskySolve(n: m, nrhs: nrhs, factor: factor.base, b: x)
    }

    /// Bytes held (Gram and factor).
    var bytes: Int { gram.bytes + factor.bytes }

    /// Flops of one factorization (m³/3).
    var factorFlops: Double { Double(m) * Double(m) * Double(m) / 3 }

    private static func factorize(
        gram: Storage<Double>, m: Int, damping: Double, budget: MemoryBudget
    ) throws(TENGraDError) -> (Storage<Double>, Double) {
        let n = m * m  // m×m already allocated once as `gram`, so this cannot overflow
        let factor = try Storage<Double>(count: n, budget: budget, what: "Cholesky factor (\(m)×\(m) doubles)")
        let k = gram.base, l = factor.base
        let shift = Double(m) * damping
        var maxDiagonal = 0.0
        for i in 0..<m { maxDiagonal = max(maxDiagonal, k[i * m + i]) }
        let scale = maxDiagonal + shift
        var jitter = 0.0
        for attempt in 0...10 {
            if attempt > 0 { jitter = scale * 1e-16 * pow10(attempt) }
            // Copy K + (mλ + jitter) I. Finite when its largest diagonal entry is: every entry of
            // a Gram is at most the largest diagonal one in magnitude.
            guard scale.isFinite, (shift + jitter).isFinite else {
                throw TENGraDError(.numerical, "the \(m)×\(m) system K + mλI overflows float64 (per-sample gradients too large)")
            }
            l.update(from: k, count: n)
            for i in 0..<m { l[i * m + i] += shift + jitter }
            if BLAS.choleskyFactor(n: m, a: l) == 0 { return (factor, jitter) }
        }
        throw TENGraDError(
            .numerical,
            "Cholesky factorization of the \(m)×\(m) system K + mλI failed (λ = \(damping)) even with jitter \(jitter)")
    }
}

@inline(__always) private func pow10(_ k: Int) -> Double {
    var p = 1.0
    for _ in 0..<k { p *= 10 }
    return p
}
