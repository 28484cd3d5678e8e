// MARK: - Array conveniences

extension Preconditioner {
    /// `updateCurvature` with arrays.
    public func updateCurvature(layer: Int, batch: Int, activations: [Float], outputGrads: [Float], gradScale: Float) throws(TENGraDError) {
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try updateCurvature(layer: layer, batch: batch, activations: a, outputGrads: g, gradScale: gradScale)
            }
        }
    }

    /// `perSampleGradients` with arrays (sequences: `tokens` per sample, an optional mask);
    /// returns the batch × (weight + bias) rows.
    public func perSampleGradients(
        layer: Int, batch: Int, tokens: Int = 1, activations: [Float], outputGrads: [Float], mask: [UInt8]? = nil,
        gradScale: Float
    ) throws(TENGraDError) -> [Float] {
        var rows = [Float](repeating: 0, count: try arrayCounts(layer: layer, batch: batch).perSampleGradients)
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try rows.withUnsafeMutableBufferPointer { (o) throws(TENGraDError) in
                    try withOptionalBuffer(mask) { (k) throws(TENGraDError) in
                        try perSampleGradients(layer: layer, batch: batch, tokens: tokens, activations: a, outputGrads: g,
                                               mask: k, gradScale: gradScale, into: o)
                    }
                }
            }
        }
        return rows
    }

    /// `updateCurvature` from per-sample gradient rows in an array.
    public func updateCurvature(layer: Int, batch: Int, perSampleGradients rows: [Float]) throws(TENGraDError) {
        try rows.withUnsafeBufferPointer { (u) throws(TENGraDError) in
            try updateCurvature(layer: layer, batch: batch, perSampleGradients: u)
        }
    }

    /// `setBase` with arrays (nil weight base: clear).
    public func setBase(layer: Int, weightBase: [Float]?, biasBase: [Float]?) throws(TENGraDError) {
        try withOptionalBuffer(weightBase) { (w) throws(TENGraDError) in
            try withOptionalBuffer(biasBase) { (b) throws(TENGraDError) in
                try setBase(layer: layer, weightBase: w, biasBase: b)
            }
        }
    }

    /// `precondition` with arrays; returns the weight update and the bias update (nil without bias).
    public func precondition(layer: Int, weightGrad: [Float], biasGrad: [Float]?) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        try updates(layer: layer, weightGrad, biasGrad) { (w, b, wu, bu) throws(TENGraDError) in
            try precondition(layer: layer, weightGrad: w, biasGrad: b, weightUpdate: wu, biasUpdate: bu)
        }
    }

    /// `preconditionPrepare` with arrays.
    public func preconditionPrepare(layer: Int, weightGrad: [Float], biasGrad: [Float]?) throws(TENGraDError) {
        try weightGrad.withUnsafeBufferPointer { (w) throws(TENGraDError) in
            try withOptionalBuffer(biasGrad) { (b) throws(TENGraDError) in
                try preconditionPrepare(layer: layer, weightGrad: w, biasGrad: b)
            }
        }
    }

    /// `preconditionFinish` with arrays (the ones given to `preconditionPrepare`); returns the
    /// weight update and the bias update (nil without bias), times `scale`.
    public func preconditionFinish(
        layer: Int, weightGrad: [Float], biasGrad: [Float]?, scale: Double = 1
    ) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        try updates(layer: layer, weightGrad, biasGrad) { (w, b, wu, bu) throws(TENGraDError) in
            try preconditionFinish(layer: layer, weightGrad: w, biasGrad: b, scale: scale, weightUpdate: wu, biasUpdate: bu)
        }
    }

    /// New update arrays of the layer's sizes, written by `body` from the gradient arrays.
    private func updates(
        layer: Int, _ weightGrad: [Float], _ biasGrad: [Float]?,
        _ body: (UnsafeBufferPointer<Float>, UnsafeBufferPointer<Float>?, UnsafeMutableBufferPointer<Float>,
                 UnsafeMutableBufferPointer<Float>?) throws(TENGraDError) -> Void
    ) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        let counts = try arrayCounts(layer: layer, batch: 0)
        var weight = [Float](repeating: 0, count: counts.weight)
        var bias: [Float]? = counts.bias > 0 ? [Float](repeating: 0, count: counts.bias) : nil
        try weightGrad.withUnsafeBufferPointer { (w) throws(TENGraDError) in
            try withOptionalBuffer(biasGrad) { (b) throws(TENGraDError) in
                try weight.withUnsafeMutableBufferPointer { (wu) throws(TENGraDError) in
                    try withOptionalMutableBuffer(&bias) { (bu) throws(TENGraDError) in try body(w, b, wu, bu) }
                }
            }
        }
        return (weight, bias)
    }

    /// Sequence `updateCurvature` with arrays: activations [batch][tokens][in], mask [batch][tokens] or nil.
    public func updateCurvature(
        layer: Int, batch: Int, tokens: Int, activations: [Float], outputGrads: [Float], mask: [UInt8]?, gradScale: Float
    ) throws(TENGraDError) {
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try withOptionalBuffer(mask) { (k) throws(TENGraDError) in
                    try updateCurvature(layer: layer, batch: batch, tokens: tokens, activations: a, outputGrads: g, mask: k,
                                        gradScale: gradScale)
                }
            }
        }
    }

    /// `naturalGradient` with arrays; returns the weight update and the bias update (nil without bias).
    public func naturalGradient(
        layer: Int, batch: Int, activations: [Float], outputGrads: [Float], gradScale: Float
    ) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        try naturalGradient(layer: layer, batch: batch, tokens: 1, activations: activations, outputGrads: outputGrads, mask: nil,
                            gradScale: gradScale)
    }

    /// Sequence `naturalGradient` with arrays (see the sequence `updateCurvature`).
    public func naturalGradient(
        layer: Int, batch: Int, tokens: Int, activations: [Float], outputGrads: [Float], mask: [UInt8]?, gradScale: Float
    ) throws(TENGraDError) -> (weight: [Float], bias: [Float]?) {
        let counts = try arrayCounts(layer: layer, batch: 0)
        var weight = [Float](repeating: 0, count: counts.weight)
        var bias: [Float]? = counts.bias > 0 ? [Float](repeating: 0, count: counts.bias) : nil
        try activations.withUnsafeBufferPointer { (a) throws(TENGraDError) in
            try outputGrads.withUnsafeBufferPointer { (g) throws(TENGraDError) in
                try weight.withUnsafeMutableBufferPointer { (wu) throws(TENGraDError) in
                    try withOptionalMutableBuffer(&bias) { (bu) throws(TENGraDError) in
                        try withOptionalBuffer(mask) { (k) throws(TENGraDError) in
                            try naturalGradient(
                                layer: layer, batch: batch, tokens: tokens, activations: a, outputGrads: g, mask: k,
                                gradScale: gradScale, weightUpdate: wu, biasUpdate: bu)
                        }
                    }
                }
            }
        }
        return (weight, bias)
    }
}

private func withOptionalBuffer<T, R>(
    _ array: [T]?, _ body: (UnsafeBufferPointer<T>?) throws(TENGraDError) -> R
) throws(TENGraDError) -> R {
    guard let array else { return try body(nil) }
    return try array.withUnsafeBufferPointer { (p) throws(TENGraDError) in try body(p) }
}

private func withOptionalMutableBuffer<R>(
    _ array: inout [Float]?, _ body: (UnsafeMutableBufferPointer<Float>?) throws(TENGraDError) -> R
) throws(TENGraDError) -> R {
    guard array != nil else { return try body(nil) }
    return try array!.withUnsafeMutableBufferPointer { (p) throws(TENGraDError) in try body(p) }
}
