// Token masks and token modes of linear layers over sequences (docs/DESIGN.md §12): the batch a
// sequence call hands the layer.

extension Preconditioner {
    /// A sequence batch as the layer's calls take it: samples, positions and the arrays — the
    /// caller's, or copies (kept alive here) with masked tokens zeroed (per sequence) or left out
    /// (per token).
    struct SequenceBatch {
        let batch: Int
        let tokens: Int
        let activations: UnsafePointer<Float>
        let outputGrads: UnsafePointer<Float>
        let copies: (Storage<Float>, Storage<Float>)?
    }

    /// Checks a sequence call's arrays and mask (batch × tokens bytes, each 0 or 1) and applies
    /// the layer's token mode. Nothing is written anywhere the caller can see.
    func sequenceBatch(
        _ l: ExactBlock, batch: Int, tokens: Int, _ activations: UnsafeBufferPointer<Float>,
        _ outputGrads: UnsafeBufferPointer<Float>, mask: UnsafeBufferPointer<UInt8>?, gradScale: Float
    ) throws(TENGraDError) -> SequenceBatch {
        guard tokens > 0 else { throw .invalid("tokens must be positive, got \(tokens)") }
        let counts = try l.kernel(tokens: tokens).dims.inputCounts(batch: batch)
        try Arguments.checkScale(gradScale)
        let a = try Arguments.base(activations, count: counts.activations, "activations")
        let g = try Arguments.base(outputGrads, count: counts.outputGrads, "output_grads")
        let perToken = l.tokenMode == .perToken
        guard let mask else {
            return perToken ? SequenceBatch(batch: try checkedProduct(batch, tokens, what: "batch × tokens"), tokens: 1,
                                            activations: a, outputGrads: g, copies: nil)
                            : SequenceBatch(batch: batch, tokens: tokens, activations: a, outputGrads: g, copies: nil)
        }
        let positions = try checkedProduct(batch, tokens, what: "batch × tokens")
        let flags = try Arguments.base(mask, count: positions, "mask")
        var kept = 0
        for i in 0..<positions {
            guard flags[i] <= 1 else { throw .invalid("mask[\(i)] is \(flags[i]); a mask holds 0 (padding) or 1 (token)") }
            kept += Int(flags[i])
        }
        if perToken, kept == 0 { throw .invalid("the mask selects no token (per-token mode needs at least one)") }
        let width = l.dims.inputSize, outWidth = l.dims.outputSize  // one token's features (the layer's own T = 1)
        let rows = perToken ? kept : positions
        let ca = try Storage<Float>(count: try checkedProduct(rows, width, what: "masked activations"), budget: budget, what: "masked activations")
        let cg = try Storage<Float>(count: try checkedProduct(rows, outWidth, what: "masked output gradients"), budget: budget, what: "masked output gradients")
        var r = 0
        for i in 0..<positions {
            if flags[i] == 1 {
                (ca.base + r * width).update(from: a + i * width, count: width)
                (cg.base + r * outWidth).update(from: g + i * outWidth, count: outWidth)
                r += 1
            } else if !perToken {  // padding contributes nothing, whatever it holds
                (ca.base + r * width).update(repeating: 0, count: width)
                (cg.base + r * outWidth).update(repeating: 0, count: outWidth)
                r += 1
            }
        }
        return SequenceBatch(batch: perToken ? kept : batch, tokens: perToken ? 1 : tokens,
                             activations: ca.base, outputGrads: cg.base, copies: (ca, cg))
    }
}
