// Part of `Preconditioner` (Preconditioner.swift: settings, layers, KL clipping).
// The computing entry points: curvature, per-sample rows, preconditioning, one-call updates,
// for plain batches and sequences.
extension Preconditioner {
    /// Takes a curvature snapshot of `layer` from a batch, replacing the previous one.
    /// `activations` is [batch][in] (linear), `outputGrads` [batch][out]; `gradScale` s makes the
    /// output gradients per-sample ones (mean-reduced loss: s = batch; sum-reduced: s = 1).
    public func updateCurvature(
        layer id: Int, batch: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, gradScale: Float
    ) throws(TENGraDError) {
        try updateCurvature(layer: id, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads,
                            mask: nil, gradScale: gradScale)
    }

    /// The per-sample gradients of a batch as data: row i of `out` (batch × (weight + bias)) is
    /// `gradScale` × sample i's gradient, weight then bias in the gradients' layout. No state
    /// changes. With `updateCurvature(layer:batch:perSampleGradients:)` on another handle (another
    /// process), a snapshot travels as these rows (docs/DESIGN.md §11). On failure `out` is
    /// unspecified.
    public func perSampleGradients(
        layer id: Int, batch: Int, activations: UnsafeBufferPointer<Float>, outputGrads: UnsafeBufferPointer<Float>,
        gradScale: Float, into out: UnsafeMutableBufferPointer<Float>
    ) throws(TENGraDError) {
        try perSampleGradients(layer: id, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads,
                               mask: nil, gradScale: gradScale, into: out)
    }

    /// `perSampleGradients` of sequences (a linear layer over tokens, per-sequence mode): row i is
    /// sequence i's gradient, `s Σ_t mask_it g_it ã_itᵀ`; one row per sequence whatever T and the
    /// mask, so processes with different sequence lengths send rows of one width.
    public func perSampleGradients(
        layer id: Int, batch: Int, tokens: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float,
        into out: UnsafeMutableBufferPointer<Float>
    ) throws(TENGraDError) {
        let l = try layer(id)
        guard l.tokenMode == .perSequence || (tokens == 1 && mask == nil) else {
            throw .invalid("per-sample gradient rows of a per-token layer: use its raw tokens (layer \(id))")
        }
        let count = try checkedProduct(batch, l.dims.parameters, what: "batch × parameters (per-sample gradients)")
        let o = UnsafeMutablePointer(mutating: try Arguments.base(UnsafeBufferPointer(out), count: count, "out_rows"))
        try withSequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale,
                              outputs: ((o, count), (nil, 0))) { (b) throws(TENGraDError) in
            try l.perSampleGradients(batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads,
                                     scale: gradScale, into: o, context: context)
        }
    }

    /// Takes a curvature snapshot from per-sample gradient rows (batch × (weight + bias), already
    /// scaled, as `perSampleGradients` writes them), replacing the previous one. The snapshot keeps
    /// the rows (per-sample representation, whatever the representation setting) and equals the one
    /// `updateCurvature` would take from the batch the rows came from, up to float32 rounding.
    public func updateCurvature(layer id: Int, batch: Int, perSampleGradients rows: UnsafeBufferPointer<Float>) throws(TENGraDError) {
        let l = try layer(id)
        _ = try l.dims.inputCounts(batch: batch)
        let count = try checkedProduct(batch, l.dims.parameters, what: "batch × parameters (per-sample gradients)")
        let u = try Arguments.base(rows, count: count, "per_sample_gradients")
        try compute { () throws(TENGraDError) in
            try l.updateCurvature(batch: batch, perSampleGradients: u, context: context)
        }
    }

    // MARK: - Sequences (linear layers over tokens, docs/DESIGN.md §12)

    /// A computing call (`compute`) on the sequence batch of the caller's arrays: checks them,
    /// refuses `outputs` (weight, bias) that overlap them, and keeps any masked copies alive while
    /// `body` runs.
    private func withSequenceBatch(
        _ l: ExactBlock, batch: Int, tokens: Int, _ activations: UnsafeBufferPointer<Float>,
        _ outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float,
        outputs: ((UnsafeMutablePointer<Float>, Int), (UnsafeMutablePointer<Float>?, Int))?,
        _ body: (SequenceBatch) throws(TENGraDError) -> Void
    ) throws(TENGraDError) {
        try compute { () throws(TENGraDError) in
            let b = try sequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale)
            if let (weight, bias) = outputs {
                // sequenceBatch checked the caller's arrays non-NULL and sized.
                guard let a = activations.baseAddress, let g = outputGrads.baseAddress else { throw .invalid("activations is NULL") }
                try Arguments.checkNoOverlap(outputs: weight, bias,
                                        inputs: [(a, activations.count, "activations"), (g, outputGrads.count, "output_grads")])
            }
            try withExtendedLifetime(b.copies) { () throws(TENGraDError) in try body(b) }
        }
    }

    /// `updateCurvature` for a linear layer applied over sequences: activations [batch][tokens][in],
    /// output gradients [batch][tokens][out] (PyTorch's batch-first layout), an optional mask
    /// [batch][tokens] of 0 (padding: contributes nothing, whatever its values) and 1. Per
    /// sequence (default), a sample is a sequence: `u_i = s Σ_t g_it ã_itᵀ`, the exact Fisher block
    /// of per-sequence gradients; per token, every unmasked token is a sample. `tokens` may differ
    /// between calls.
    public func updateCurvature(
        layer id: Int, batch: Int, tokens: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float
    ) throws(TENGraDError) {
        let l = try layer(id)
        try withSequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale,
                              outputs: nil) { (b) throws(TENGraDError) in
            try l.updateCurvature(batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads,
                                  scale: gradScale, context: context)
        }
    }

    /// `naturalGradient` for a linear layer over sequences (see the sequence `updateCurvature`).
    public func naturalGradient(
        layer id: Int, batch: Int, tokens: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float,
        weightUpdate: UnsafeMutableBufferPointer<Float>, biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) {
        let l = try layer(id)
        let (wu, bu) = try Arguments.updateOutputs(l, weightUpdate, biasUpdate)
        try withSequenceBatch(l, batch: batch, tokens: tokens, activations, outputGrads, mask: mask, gradScale: gradScale,
                              outputs: ((wu, l.dims.weightCount), (bu, l.dims.biasCount))) { (b) throws(TENGraDError) in
            try l.naturalGradient(
                batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads, scale: gradScale,
                weightUpdate: wu, biasUpdate: bu, context: context)
        }
    }

    /// `update = (F + λI)⁻¹ grad` with F from the layer's current snapshot. The update buffers may
    /// be the gradient buffers themselves (in place).
    public func precondition(
        layer id: Int, weightGrad: UnsafeBufferPointer<Float>, biasGrad: UnsafeBufferPointer<Float>?,
        weightUpdate: UnsafeMutableBufferPointer<Float>, biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) {
        let l = try layer(id)
        let (w, b, wu, bu) = try Arguments.update(l, weightGrad, biasGrad, weightUpdate, biasUpdate)
        try compute { () throws(TENGraDError) in
            try l.precondition(weightGrad: w, biasGrad: b, weightUpdate: wu, biasUpdate: bu, context: context)
        }
    }

    /// The first phase of a precondition in two (docs/DESIGN.md §6): everything that can fail
    /// (the gradient's checks, Uᵀv, the solve, the float32 bounds), and ⟨update, grad⟩ recorded
    /// for `klClipFactor`; no output is written. `preconditionFinish` then writes the update, times
    /// a factor known only once every layer is prepared (KL clipping's ν), so a step over many
    /// layers writes nothing until all succeeded — in place, without a copy. A new
    /// `preconditionPrepare` of the layer replaces an unfinished one; a curvature update or a loaded
    /// state drops it.
    public func preconditionPrepare(
        layer id: Int, weightGrad: UnsafeBufferPointer<Float>, biasGrad: UnsafeBufferPointer<Float>?
    ) throws(TENGraDError) {
        let l = try layer(id)
        let w = try Arguments.base(weightGrad, count: l.dims.weightCount, "weight_grad")
        let b = try Arguments.bias(biasGrad, count: l.dims.biasCount, "bias_grad")
        try compute { () throws(TENGraDError) in
            try l.preparePrecondition(weightGrad: w, biasGrad: b, context: context)
        }
    }

    /// The second phase: `scale · (F + λI)⁻¹ grad` for the gradient the first phase read — the
    /// caller passes the same arrays, unchanged — written to the update buffers (which may be the
    /// gradient buffers: in place). `scale` = 1 gives `precondition`'s bits. Fails only when the
    /// layer has no first phase since its last second one (or since its snapshot changed), or
    /// when `scale` > 1 would overflow float32; the first phase is then kept. The recorded
    /// ⟨update, grad⟩ stays the unscaled update's (`klClipFactor` gives the same ν again).
    public func preconditionFinish(
        layer id: Int, weightGrad: UnsafeBufferPointer<Float>, biasGrad: UnsafeBufferPointer<Float>?, scale: Double,
        weightUpdate: UnsafeMutableBufferPointer<Float>, biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) {
        let l = try layer(id)
        guard scale.isFinite else { throw .invalid("scale must be finite, got \(scale)") }
        let (w, b, wu, bu) = try Arguments.update(l, weightGrad, biasGrad, weightUpdate, biasUpdate)
        try compute { () throws(TENGraDError) in
            try l.finishPrecondition(weightGrad: w, biasGrad: b, scale: scale, weightUpdate: wu, biasUpdate: bu,
                                     context: context)
        }
    }

    /// Empirical Fisher in one call: snapshot from this batch, and the update of this batch's mean
    /// gradient, `(F + λI)⁻¹ (1/m) Σ_i u_i = U (UᵀU + mλI)⁻¹ 1`, written to the update buffers.
    public func naturalGradient(
        layer id: Int, batch: Int, activations: UnsafeBufferPointer<Float>,
        outputGrads: UnsafeBufferPointer<Float>, gradScale: Float,
        weightUpdate: UnsafeMutableBufferPointer<Float>, biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) {
        try naturalGradient(layer: id, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads,
                            mask: nil, gradScale: gradScale, weightUpdate: weightUpdate, biasUpdate: biasUpdate)
    }
}
