/// What every rank of a data-parallel run must compute identically, without communication
/// (docs/DESIGN.md §11): the owner of each layer's m×m system, and the KL-clipping factor from a
/// global sum. One implementation, which the C ABI exports, so the Python integration and the MPI
/// example do not each carry a copy.
public enum DataParallel {
    /// Layer → owner rank: layers by cost (descending, ties by index), each to the least-loaded
    /// rank (ties: the lowest) — KAISA's greedy assignment with TENGraD's costs.
    public static func owners(costs: [Int64], ranks: Int) throws(TENGraDError) -> [Int] {
        guard ranks >= 1 else { throw .invalid("ranks must be >= 1, got \(ranks)") }
        for (i, c) in costs.enumerated() where c < 0 { throw .invalid("cost of layer \(i) is negative (\(c))") }
        var load = [Double](repeating: 0, count: ranks)
        var owners = [Int](repeating: 0, count: costs.count)
        let order = costs.indices.sorted { costs[$0] != costs[$1] ? costs[$0] > costs[$1] : $0 < $1 }
        for i in order {
            var best = 0
            for r in 1..<ranks where load[r] < load[best] { best = r }
            owners[i] = best
            load[best] += Double(costs[i])
        }
        return owners
    }

    /// ν = min(1, sqrt(κ / (lr² · Σ⟨update, grad⟩))); 1 when the sum is not positive or lr is 0.
    public static func klClipFactor(learningRate: Double, klClip: Double, sum: Double) throws(TENGraDError) -> Double {
        guard learningRate.isFinite, learningRate >= 0 else {
            throw .invalid("learning_rate must be finite and >= 0, got \(learningRate)")
        }
        guard klClip.isFinite, klClip > 0 else { throw .invalid("kl_clip must be finite and > 0, got \(klClip)") }
        guard !sum.isNaN else { throw .invalid("the sum of <update, grad> is NaN") }
        guard learningRate > 0, sum > 0, sum.isFinite else { return 1 }
        return min(1, (klClip / (learningRate * learningRate * sum)).squareRoot())
    }
}
