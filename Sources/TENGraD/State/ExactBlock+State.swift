/// A layer's part of saved state: its settings, its curvature snapshot (either representation,
/// Gram, Cholesky factor) and the last update's ⟨update, grad⟩ for KL clipping.
///
/// Format version 4:
///
///     u32 strategy setting        (0 auto, 1 factored, 2 explicit)
///     u32 representation setting  (0 auto, 1 raw, 2 per-sample)
///     u32 token mode setting      (0 per sequence, 1 per token; 0 for conv layers)
///     u32 damping mode setting    (0 absolute, 1 relative)
///     u32 base setting            (0 none, 1 set); if 1: f32 × d, the diagonal base e
///     u32 snapshot                (0 none, 1 raw, 2 per-sample); if not 0:
///         i64 m, i64 tokens T (positions per sample of a raw batch; 1 for conv layers),
///         f32 grad scale, f64 λ of the factor, f64 jitter, f64 1-norm,
///         raw:        f32 × activations count, f32 × output-gradient count
///         per-sample: f32 × m·d  (U unscaled, rows [weight | bias])
///         f64 × m² Gram (of U E^{-1/2} with a base), f64 × m² factor
///         u32 snapshot base (0 none, 1 set); if 1: f32 × d
///         u32 snapshot damping (1: λ's factor is tr(K)/(m·min(m, d)) of the Gram — relative — and
///             not 1; else 0)
///     u32 has update, f64 ⟨update, grad⟩
///
/// Version 3 (still read): no damping mode, no base. Version 2 (still read): no token mode, no T (T = 1). Version 1 (still read): u32 strategy
/// setting, u32 has snapshot (raw only, no representation setting), then the same fields.
extension ExactBlock {
    /// A layer state parsed and allocated, not yet installed.
    struct Restored {
        let strategy: ConvStrategy
        let representation: SnapshotRepresentation
        let tokenMode: TokenMode
        let dampingMode: DampingMode
        let base: DiagonalBase?
        let snapshot: Snapshot?
        let hasUpdate: Bool
        let updateDotGrad: Double
    }

    // Format numbers of the settings (the state format's own, independent of the C ABI's).
    private static let strategyCodes: [(ConvStrategy, UInt32)] = [(.auto, 0), (.factored, 1), (.explicit, 2)]
    private static let representationCodes: [(SnapshotRepresentation, UInt32)] = [(.auto, 0), (.raw, 1), (.perSample, 2)]
    private static let tokenModeCodes: [(TokenMode, UInt32)] = [(.perSequence, 0), (.perToken, 1)]
    private static let dampingModeCodes: [(DampingMode, UInt32)] = [(.absolute, 0), (.relative, 1)]

    private static func code<T: Equatable>(_ value: T, in table: [(T, UInt32)]) -> UInt32 {
        table.first { $0.0 == value }?.1 ?? 0
    }

    private static func value<T>(_ code: UInt32, in table: [(T, UInt32)]) -> T? {
        table.first { $0.1 == code }?.0
    }

    func writeState(_ w: inout StateWriter) {
        w.u32(Self.code(strategySetting, in: Self.strategyCodes))
        w.u32(Self.code(representationSetting, in: Self.representationCodes))
        w.u32(Self.code(tokenMode, in: Self.tokenModeCodes))
        w.u32(Self.code(dampingMode, in: Self.dampingModeCodes))
        Self.writeBase(baseSetting, &w)
        guard let s = snapshot else {
            w.u32(0)
            w.bool(record.hasUpdate)
            w.f64(record.updateDotGrad)
            return
        }
        w.u32(Self.code(s.representation, in: Self.representationCodes))
        w.i64(s.m)
        w.i64(s.tokens)
        w.f32(s.scale)
        w.f64(s.system.damping)
        w.f64(s.system.jitter)
        w.f64(s.system.anorm)
        switch s.data {
        case let .raw(a, g):
            w.floats(a.base, a.count)
            w.floats(g.base, g.count)
        case let .perSample(u):
            w.floats(u.base, u.count)
        }
        w.doubles(s.system.gram.base, s.m * s.m)
        w.doubles(s.system.factor.base, s.m * s.m)
        Self.writeBase(s.base, &w)
        w.bool(s.dampingScale != 1)
        w.bool(record.hasUpdate)
        w.f64(record.updateDotGrad)
    }

    private static func writeBase(_ base: DiagonalBase?, _ w: inout StateWriter) {
        w.bool(base != nil)
        if let base { w.floats(base.scale.base, base.count) }
    }

    /// A base (format 4), checked: every entry a normal positive float.
    private func readBase(_ r: inout StateReader, _ what: String, budget: MemoryBudget,
                          corrupt: (String) -> TENGraDError) throws(TENGraDError) -> DiagonalBase? {
        guard try r.bool("\(what) flag") else { return nil }
        let d = dims.parameters
        try r.require(try checkedProduct(d, 4, what: what), size: 1, what)
        let e = try Storage<Float>(count: d, budget: budget, what: "restored \(what)")
        try r.floats(into: e.base, d, what)
        guard let base = try DiagonalBase(restoring: e, budget: budget) else { throw corrupt("invalid \(what)") }
        return base
    }

    /// Parses and validates this layer's state (format `version`), allocating the snapshot
    /// against `budget`. Throws `.corrupt` for anything inconsistent; changes nothing.
    func readState(_ r: inout StateReader, version: UInt32, layer id: Int, budget: MemoryBudget) throws(TENGraDError) -> Restored {
        func corrupt(_ message: String) -> TENGraDError { StateReader.corrupt("layer \(id): \(message)") }
        let strategyCode = try r.u32("strategy setting")
        guard let strategy = Self.value(strategyCode, in: Self.strategyCodes) else {
            throw corrupt("invalid strategy setting \(strategyCode)")
        }
        var representation = SnapshotRepresentation.auto
        var tokenMode = TokenMode.perSequence
        var kind = SnapshotRepresentation.auto
        var base: DiagonalBase?
        var dampingMode = DampingMode.absolute
        if version >= 2 {
            let settingCode = try r.u32("representation setting")
            guard let setting = Self.value(settingCode, in: Self.representationCodes) else {
                throw corrupt("invalid representation setting \(settingCode)")
            }
            representation = setting
            if version >= 3 {
                let modeCode = try r.u32("token mode")
                guard let mode = Self.value(modeCode, in: Self.tokenModeCodes),
                      geometry.takesTokens || mode == .perSequence else { throw corrupt("invalid token mode \(modeCode)") }
                tokenMode = mode
            }
            if version >= 4 {
                let code = try r.u32("damping mode")
                guard let mode = Self.value(code, in: Self.dampingModeCodes) else { throw corrupt("invalid damping mode \(code)") }
                dampingMode = mode
                base = try readBase(&r, "base setting", budget: budget, corrupt: corrupt)
            }
            let kindCode = try r.u32("snapshot kind")
            guard let k = Self.value(kindCode, in: Self.representationCodes) else { throw corrupt("invalid snapshot kind \(kindCode)") }
            kind = k
        } else {
            kind = try r.bool("snapshot flag") ? .raw : .auto
        }
        var snap: Snapshot?
        if kind != .auto {
            let m = try r.i64("batch")
            let tokens = version >= 3 ? try r.i64("tokens") : 1
            let k: BlockKernel
            do { k = try kernel(tokens: tokens) } catch { throw corrupt("invalid tokens \(tokens)") }
            let counts: (activations: Int, outputGrads: Int)
            do { counts = try k.dims.inputCounts(batch: m) } catch { throw corrupt("invalid batch \(m)") }
            let scale = try r.f32("grad scale"), damping = try r.f64("damping"), jitter = try r.f64("jitter"), anorm = try r.f64("norm")
            guard scale.isFinite, scale > 0 else { throw corrupt("invalid grad scale \(scale)") }
            guard damping.isFinite, damping > 0 else { throw corrupt("invalid damping \(damping)") }
            guard jitter.isFinite, jitter >= 0, anorm.isFinite, anorm >= 0 else { throw corrupt("invalid jitter or norm") }
            let mm = try checkedProduct(m, m, what: "batch²")
            let numbers = kind == .raw
                ? try checkedSum(counts.activations, counts.outputGrads, what: "snapshot")
                : try checkedProduct(m, dims.parameters, what: "snapshot")
            // All the data must be present before anything is allocated for it.
            let total = try checkedSum(try checkedProduct(numbers, 4, what: "snapshot"),
                                       try checkedProduct(mm, 16, what: "snapshot"), what: "snapshot")
            try r.require(total, size: 1, "layer \(id) snapshot")
            let data: Snapshot.Data
            let entryBound: Double
            if kind == .raw {
                let a = try Storage<Float>(count: counts.activations, budget: budget, what: "restored activations")
                let g = try Storage<Float>(count: counts.outputGrads, budget: budget, what: "restored output gradients")
                try r.floats(into: a.base, counts.activations, "activations")
                try r.floats(into: g.base, counts.outputGrads, "output gradients")
                let scanA = ArrayScan(a.base, count: a.count), scanG = ArrayScan(g.base, count: g.count)
                guard scanA.finite, scanG.finite else { throw corrupt("non-finite activations or output gradients") }
                do { try k.geometry.checkActivations(a.base, count: a.count) } catch { throw corrupt(error.message) }
                data = .raw(activations: a, outputGrads: g)
                entryBound = Snapshot.rawEntryBound(
                    scale: scale, dims: k.dims, maxPatch: k.geometry.patchBound(maxActivation: scanA.maxAbs), maxOutputGrad: scanG.maxAbs)
            } else {
                let u = try Storage<Float>(count: numbers, budget: budget, what: "restored per-sample gradients")
                try r.floats(into: u.base, numbers, "per-sample gradients")
                let scan = ArrayScan(u.base, count: numbers)
                guard scan.finite else { throw corrupt("non-finite per-sample gradients") }
                data = .perSample(u)
                entryBound = Double(scale) * Double(scan.maxAbs)
            }
            let gram = try Storage<Double>(count: mm, budget: budget, what: "restored Gram")
            let factor = try Storage<Double>(count: mm, budget: budget, what: "restored factor")
            try r.doubles(into: gram.base, mm, "Gram")
            try r.doubles(into: factor.base, mm, "factor")
            var finite = true
            for i in 0..<mm { finite = finite && gram.base[i].isFinite && factor.base[i].isFinite }
            for i in 0..<m { finite = finite && factor.base[i * m + i] > 0 }
            guard finite else { throw corrupt("non-finite Gram, or a factor without a positive diagonal") }
            let system = DampedSystem(restoring: gram, factor: factor, m: m, damping: damping, jitter: jitter, anorm: anorm)
            let snapshotBase = version >= 4 ? try readBase(&r, "snapshot base", budget: budget, corrupt: corrupt) : nil
            let relative = version >= 4 ? try r.bool("snapshot damping") : false
            snap = Snapshot(m: m, tokens: tokens, scale: scale, data: data, entryBound: entryBound, system: system,
                            base: snapshotBase,
                            dampingScale: relative ? Snapshot.relativeScale(gram, m: m, parameters: dims.parameters) : 1)
        }
        let hasUpdate = try r.bool("update flag")
        let dot = try r.f64("update · grad")
        guard dot.isFinite else { throw corrupt("non-finite update · grad") }
        return Restored(strategy: strategy, representation: representation, tokenMode: tokenMode, dampingMode: dampingMode,
                        base: base, snapshot: snap,
                        hasUpdate: hasUpdate, updateDotGrad: dot)
    }

    /// Makes restored state current. Cannot fail.
    func install(_ restored: Restored) {
        strategySetting = restored.strategy
        representationSetting = restored.representation
        tokenMode = restored.tokenMode
        dampingMode = restored.dampingMode
        baseSetting = restored.base
        replaceSnapshot(restored.snapshot)
        record.hasUpdate = restored.hasUpdate
        record.updateDotGrad = restored.updateDotGrad
    }
}
