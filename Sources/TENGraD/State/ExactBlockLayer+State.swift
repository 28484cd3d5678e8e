/// A layer's part of saved state: its curvature snapshot (batch copies, Gram, Cholesky factor),
/// the last update's ⟨update, grad⟩ for KL clipping, and the conv strategy setting.
///
///     u32 strategy setting (0 for linear layers)
///     u32 has snapshot; if 1:
///         i64 m, f32 grad scale, f64 λ of the factor, f64 jitter, f64 1-norm,
///         f32 × activations count, f32 × output-gradient count, f64 × m² Gram, f64 × m² factor
///     u32 has update, f64 ⟨update, grad⟩
extension ExactBlockLayer {
    /// A layer state parsed and allocated, not yet installed.
    struct Restored {
        let strategy: ConvStrategy
        let snapshot: Snapshot?
        let hasUpdate: Bool
        let updateDotGrad: Double
    }

    var strategySettingCode: UInt32 { UInt32((self as? Conv2dLayer)?.strategySetting.rawValue ?? 0) }

    func writeState(_ w: inout StateWriter) {
        w.u32(strategySettingCode)
        w.bool(snapshot != nil)
        if let s = snapshot {
            w.i64(s.m)
            w.f32(s.scale)
            w.f64(s.system.damping)
            w.f64(s.system.jitter)
            w.f64(s.system.anorm)
            w.floats(s.activations.base, s.activations.count)
            w.floats(s.outputGrads.base, s.outputGrads.count)
            w.doubles(s.system.gram.base, s.m * s.m)
            w.doubles(s.system.factor.base, s.m * s.m)
        }
        w.bool(record.hasUpdate)
        w.f64(record.updateDotGrad)
    }

    /// Parses and validates this layer's state, allocating the snapshot against `budget`.
    /// Throws `.corrupt` for anything inconsistent; changes nothing.
    func readState(_ r: inout StateReader, layer id: Int, budget: MemoryBudget) throws(TENGraDError) -> Restored {
        func corrupt(_ message: String) -> TENGraDError { StateReader.corrupt("layer \(id): \(message)") }
        let code = try r.u32("strategy setting")
        guard let strategy = ConvStrategy(rawValue: Int32(truncatingIfNeeded: code)), code <= 2,
              kind == .conv2d || code == 0 else { throw corrupt("invalid strategy setting \(code)") }
        var snap: Snapshot?
        if try r.bool("snapshot flag") {
            let m = try r.i64("batch")
            let counts: (activations: Int, outputGrads: Int)
            do { counts = try inputCounts(batch: m) } catch { throw corrupt("invalid batch \(m)") }
            let scale = try r.f32("grad scale"), damping = try r.f64("damping"), jitter = try r.f64("jitter"), anorm = try r.f64("norm")
            guard scale.isFinite, scale > 0 else { throw corrupt("invalid grad scale \(scale)") }
            guard damping.isFinite, damping > 0 else { throw corrupt("invalid damping \(damping)") }
            guard jitter.isFinite, jitter >= 0, anorm.isFinite, anorm >= 0 else { throw corrupt("invalid jitter or norm") }
            let mm = try checkedProduct(m, m, what: "batch²")
            // All the data must be present before anything is allocated for it.
            let numbers = try checkedSum(counts.activations, counts.outputGrads, what: "snapshot")
            let total = try checkedSum(try checkedProduct(numbers, 4, what: "snapshot"),
                                       try checkedProduct(mm, 16, what: "snapshot"), what: "snapshot")
            try r.require(total, size: 1, "layer \(id) snapshot")
            let a = try Storage<Float>(count: counts.activations, budget: budget, what: "restored activations")
            let g = try Storage<Float>(count: counts.outputGrads, budget: budget, what: "restored output gradients")
            let gram = try Storage<Double>(count: mm, budget: budget, what: "restored Gram")
            let factor = try Storage<Double>(count: mm, budget: budget, what: "restored factor")
            try r.floats(into: a.base, counts.activations, "activations")
            try r.floats(into: g.base, counts.outputGrads, "output gradients")
            try r.doubles(into: gram.base, mm, "Gram")
            try r.doubles(into: factor.base, mm, "factor")
            let scanA = ArrayScan(a.base, count: a.count), scanG = ArrayScan(g.base, count: g.count)
            guard scanA.finite, scanG.finite else { throw corrupt("non-finite activations or output gradients") }
            var finite = true
            for i in 0..<mm { finite = finite && gram.base[i].isFinite && factor.base[i].isFinite }
            for i in 0..<m { finite = finite && factor.base[i * m + i] > 0 }
            guard finite else { throw corrupt("non-finite Gram, or a factor without a positive diagonal") }
            let system = DampedSystem(restoring: gram, factor: factor, m: m, damping: damping, jitter: jitter, anorm: anorm)
            snap = Snapshot(
                m: m, activations: a, outputGrads: g, scale: scale,
                maxActivation: max(scanA.maxAbs, biasCount > 0 ? 1 : 0), maxOutputGrad: scanG.maxAbs, system: system)
        }
        let hasUpdate = try r.bool("update flag")
        let dot = try r.f64("update · grad")
        guard dot.isFinite else { throw corrupt("non-finite update · grad") }
        return Restored(strategy: strategy, snapshot: snap, hasUpdate: hasUpdate, updateDotGrad: dot)
    }

    /// Makes restored state current. Cannot fail.
    func install(_ restored: Restored) {
        (self as? Conv2dLayer)?.strategySetting = restored.strategy
        replaceSnapshot(restored.snapshot)
        record.hasUpdate = restored.hasUpdate
        record.updateDotGrad = restored.updateDotGrad
    }
}
