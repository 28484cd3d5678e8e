import CTENGraDHeader
import TENGraD

// Thunks: curvature, per-sample rows and preconditioning.

// MARK: - Preconditioning

/// A caller's `tengrad_batch` checked and sized: the header's size rule (`readCallerStruct`), then
/// the activations and output gradients non-NULL and sized from the layer, batch and tokens, and the
/// optional mask (batch × tokens bytes).
private struct DescribedBatch {
    let batch: Int, tokens: Int, gradScale: Float
    let counts: Preconditioner.ArrayCounts
    let activations: UnsafeBufferPointer<Float>
    let outputGrads: UnsafeBufferPointer<Float>
    let mask: UnsafeBufferPointer<UInt8>?

    init(_ h: Handle, _ layer: Int32, _ described: UnsafePointer<tengrad_batch>?) throws(TENGraDError) {
        let d = try readCallerStruct(described, "batch", type: "tengrad_batch", start: "TENGRAD_BATCH_INIT")
        guard d.tokens > 0 else { throw TENGraDError(.invalidArgument, "tokens must be positive, got \(d.tokens)") }
        (batch, tokens, gradScale) = (Int(d.batch), Int(d.tokens), Float(d.grad_scale))
        let c = try h.core.arrayCounts(layer: Int(layer), batch: batch, tokens: tokens)
        counts = c
        activations = UnsafeBufferPointer(start: try required(d.activations, "activations"), count: c.activations)
        outputGrads = UnsafeBufferPointer(start: try required(d.output_grads, "output_grads"), count: c.outputGrads)
        mask = d.mask.map { UnsafeBufferPointer(start: $0, count: c.mask) }
    }
}

@_cdecl("tengrad_update_curvature_v2")
public func tengrad_update_curvature_v2(_ p: OpaquePointer?, _ layer: Int32, _ batch: UnsafePointer<tengrad_batch>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try DescribedBatch(h, layer, batch)
        try h.core.updateCurvature(layer: Int(layer), batch: b.batch, tokens: b.tokens, activations: b.activations,
                                   outputGrads: b.outputGrads, mask: b.mask, gradScale: b.gradScale)
    }
}

@_cdecl("tengrad_natural_gradient_v2")
public func tengrad_natural_gradient_v2(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: UnsafePointer<tengrad_batch>?,
    _ weightUpdate: UnsafeMutablePointer<Float>?, _ biasUpdate: UnsafeMutablePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try DescribedBatch(h, layer, batch)
        let wu = UnsafeMutableBufferPointer(start: try required(weightUpdate, "weight_update"), count: b.counts.weight)
        try h.core.naturalGradient(
            layer: Int(layer), batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads,
            mask: b.mask, gradScale: b.gradScale, weightUpdate: wu,
            biasUpdate: biasUpdate.map { UnsafeMutableBufferPointer(start: $0, count: b.counts.bias) })
    }
}

@_cdecl("tengrad_per_sample_gradients_v2")
public func tengrad_per_sample_gradients_v2(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: UnsafePointer<tengrad_batch>?, _ outRows: UnsafeMutablePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try DescribedBatch(h, layer, batch)
        let rows = UnsafeMutableBufferPointer(start: try required(outRows, "out_rows"), count: b.counts.perSampleGradients)
        try h.core.perSampleGradients(
            layer: Int(layer), batch: b.batch, tokens: b.tokens, activations: b.activations, outputGrads: b.outputGrads,
            mask: b.mask, gradScale: b.gradScale, into: rows)
    }
}

// The plain and _tokens calls: thin wrappers over the same thunks' work, kept for the 0.x versions.

@_cdecl("tengrad_update_curvature")
public func tengrad_update_curvature(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ gradScale: Float
) -> Int32 {
    tengrad_update_curvature_tokens(p, layer, batch, 1, activations, outputGrads, nil, gradScale)
}

/// The descriptor of a call of the plain or _tokens shape.
private func described(
    _ batch: Int64, _ tokens: Int64, _ activations: UnsafePointer<Float>?, _ outputGrads: UnsafePointer<Float>?,
    _ mask: UnsafePointer<UInt8>?, _ gradScale: Float
) -> tengrad_batch {
    tengrad_batch(
        size: MemoryLayout<tengrad_batch>.size, batch: batch, tokens: tokens, activations: activations,
        output_grads: outputGrads, mask: mask, grad_scale: Double(gradScale))
}

@_cdecl("tengrad_update_curvature_tokens")
public func tengrad_update_curvature_tokens(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ tokens: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ mask: UnsafePointer<UInt8>?, _ gradScale: Float
) -> Int32 {
    var d = described(batch, tokens, activations, outputGrads, mask, gradScale)
    return tengrad_update_curvature_v2(p, layer, &d)
}

@_cdecl("tengrad_natural_gradient_tokens")
public func tengrad_natural_gradient_tokens(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ tokens: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ mask: UnsafePointer<UInt8>?, _ gradScale: Float,
    _ weightUpdate: UnsafeMutablePointer<Float>?, _ biasUpdate: UnsafeMutablePointer<Float>?
) -> Int32 {
    var d = described(batch, tokens, activations, outputGrads, mask, gradScale)
    return tengrad_natural_gradient_v2(p, layer, &d, weightUpdate, biasUpdate)
}

@_cdecl("tengrad_per_sample_gradients")
public func tengrad_per_sample_gradients(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ gradScale: Float, _ outRows: UnsafeMutablePointer<Float>?
) -> Int32 {
    tengrad_per_sample_gradients_tokens(p, layer, batch, 1, activations, outputGrads, nil, gradScale, outRows)
}

@_cdecl("tengrad_per_sample_gradients_tokens")
public func tengrad_per_sample_gradients_tokens(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ tokens: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ mask: UnsafePointer<UInt8>?, _ gradScale: Float,
    _ outRows: UnsafeMutablePointer<Float>?
) -> Int32 {
    var d = described(batch, tokens, activations, outputGrads, mask, gradScale)
    return tengrad_per_sample_gradients_v2(p, layer, &d, outRows)
}

@_cdecl("tengrad_update_curvature_from_gradients")
public func tengrad_update_curvature_from_gradients(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ rows: UnsafePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let counts = try h.core.arrayCounts(layer: Int(layer), batch: Int(batch))
        let u = try required(rows, "per_sample_gradients")
        try h.core.updateCurvature(
            layer: Int(layer), batch: Int(batch),
            perSampleGradients: UnsafeBufferPointer(start: u, count: counts.perSampleGradients))
    }
}

/// A precondition call's gradients (`update` false) or gradients and updates, sized by the layer.
private struct PreconditionBuffers {
    let weightGrad: UnsafeBufferPointer<Float>
    let biasGrad: UnsafeBufferPointer<Float>?
    let weightUpdate: UnsafeMutableBufferPointer<Float>?
    let biasUpdate: UnsafeMutableBufferPointer<Float>?

    init(
        _ h: Handle, _ layer: Int32, _ weightGrad: UnsafePointer<Float>?, _ biasGrad: UnsafePointer<Float>?,
        _ weightUpdate: UnsafeMutablePointer<Float>? = nil, _ biasUpdate: UnsafeMutablePointer<Float>? = nil, update: Bool
    ) throws(TENGraDError) {
        let counts = try h.core.arrayCounts(layer: Int(layer), batch: 0)
        self.weightGrad = UnsafeBufferPointer(start: try required(weightGrad, "weight_grad"), count: counts.weight)
        self.biasGrad = biasGrad.map { UnsafeBufferPointer(start: $0, count: counts.bias) }
        self.weightUpdate = update
            ? UnsafeMutableBufferPointer(start: try required(weightUpdate, "weight_update"), count: counts.weight) : nil
        self.biasUpdate = biasUpdate.map { UnsafeMutableBufferPointer(start: $0, count: counts.bias) }
    }
}

@_cdecl("tengrad_precondition")
public func tengrad_precondition(
    _ p: OpaquePointer?, _ layer: Int32, _ weightGrad: UnsafePointer<Float>?, _ biasGrad: UnsafePointer<Float>?,
    _ weightUpdate: UnsafeMutablePointer<Float>?, _ biasUpdate: UnsafeMutablePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try PreconditionBuffers(h, layer, weightGrad, biasGrad, weightUpdate, biasUpdate, update: true)
        try h.core.precondition(layer: Int(layer), weightGrad: b.weightGrad, biasGrad: b.biasGrad,
                                weightUpdate: b.weightUpdate!, biasUpdate: b.biasUpdate)
    }
}

@_cdecl("tengrad_precondition_prepare")
public func tengrad_precondition_prepare(
    _ p: OpaquePointer?, _ layer: Int32, _ weightGrad: UnsafePointer<Float>?, _ biasGrad: UnsafePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try PreconditionBuffers(h, layer, weightGrad, biasGrad, update: false)
        try h.core.preconditionPrepare(layer: Int(layer), weightGrad: b.weightGrad, biasGrad: b.biasGrad)
    }
}

@_cdecl("tengrad_precondition_finish")
public func tengrad_precondition_finish(
    _ p: OpaquePointer?, _ layer: Int32, _ weightGrad: UnsafePointer<Float>?, _ biasGrad: UnsafePointer<Float>?,
    _ scale: Double, _ weightUpdate: UnsafeMutablePointer<Float>?, _ biasUpdate: UnsafeMutablePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try PreconditionBuffers(h, layer, weightGrad, biasGrad, weightUpdate, biasUpdate, update: true)
        try h.core.preconditionFinish(layer: Int(layer), weightGrad: b.weightGrad, biasGrad: b.biasGrad, scale: scale,
                                      weightUpdate: b.weightUpdate!, biasUpdate: b.biasUpdate)
    }
}

@_cdecl("tengrad_natural_gradient")
public func tengrad_natural_gradient(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ gradScale: Float,
    _ weightUpdate: UnsafeMutablePointer<Float>?, _ biasUpdate: UnsafeMutablePointer<Float>?
) -> Int32 {
    tengrad_natural_gradient_tokens(p, layer, batch, 1, activations, outputGrads, nil, gradScale, weightUpdate, biasUpdate)
}
