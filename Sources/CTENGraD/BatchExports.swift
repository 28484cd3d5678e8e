import CTENGraDHeader
import TENGraD

// Thunks: curvature, per-sample rows and preconditioning.

// MARK: - Preconditioning

/// The batch arrays of a call: activations and output gradients checked non-NULL and sized from
/// the layer, batch and tokens, and the optional mask (batch × tokens bytes).
private struct BatchArrays {
    let counts: Preconditioner.ArrayCounts
    let activations: UnsafeBufferPointer<Float>
    let outputGrads: UnsafeBufferPointer<Float>
    let mask: UnsafeBufferPointer<UInt8>?

    init(
        _ h: Handle, _ layer: Int32, _ batch: Int64, _ tokens: Int64, _ activations: UnsafePointer<Float>?,
        _ outputGrads: UnsafePointer<Float>?, _ mask: UnsafePointer<UInt8>?
    ) throws(TENGraDError) {
        guard tokens > 0 else { throw TENGraDError(.invalidArgument, "tokens must be positive, got \(tokens)") }
        let counts = try h.core.arrayCounts(layer: Int(layer), batch: Int(batch), tokens: Int(tokens))
        self.counts = counts
        self.activations = UnsafeBufferPointer(start: try required(activations, "activations"), count: counts.activations)
        self.outputGrads = UnsafeBufferPointer(start: try required(outputGrads, "output_grads"), count: counts.outputGrads)
        self.mask = mask.map { UnsafeBufferPointer(start: $0, count: counts.mask) }
    }
}

@_cdecl("tengrad_update_curvature")
public func tengrad_update_curvature(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ gradScale: Float
) -> Int32 {
    tengrad_update_curvature_tokens(p, layer, batch, 1, activations, outputGrads, nil, gradScale)
}

@_cdecl("tengrad_update_curvature_tokens")
public func tengrad_update_curvature_tokens(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ tokens: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ mask: UnsafePointer<UInt8>?, _ gradScale: Float
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try BatchArrays(h, layer, batch, tokens, activations, outputGrads, mask)
        try h.core.updateCurvature(layer: Int(layer), batch: Int(batch), tokens: Int(tokens), activations: b.activations,
                                   outputGrads: b.outputGrads, mask: b.mask, gradScale: gradScale)
    }
}

@_cdecl("tengrad_natural_gradient_tokens")
public func tengrad_natural_gradient_tokens(
    _ p: OpaquePointer?, _ layer: Int32, _ batch: Int64, _ tokens: Int64, _ activations: UnsafePointer<Float>?,
    _ outputGrads: UnsafePointer<Float>?, _ mask: UnsafePointer<UInt8>?, _ gradScale: Float,
    _ weightUpdate: UnsafeMutablePointer<Float>?, _ biasUpdate: UnsafeMutablePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try BatchArrays(h, layer, batch, tokens, activations, outputGrads, mask)
        let wu = try required(weightUpdate, "weight_update")
        try h.core.naturalGradient(
            layer: Int(layer), batch: Int(batch), tokens: Int(tokens), activations: b.activations, outputGrads: b.outputGrads,
            mask: b.mask, gradScale: gradScale,
            weightUpdate: UnsafeMutableBufferPointer(start: wu, count: b.counts.weight),
            biasUpdate: biasUpdate.map { UnsafeMutableBufferPointer(start: $0, count: b.counts.bias) })
    }
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
    run(p) { (h) throws(TENGraDError) in
        let b = try BatchArrays(h, layer, batch, tokens, activations, outputGrads, mask)
        let o = try required(outRows, "out_rows")
        try h.core.perSampleGradients(
            layer: Int(layer), batch: Int(batch), tokens: Int(tokens), activations: b.activations, outputGrads: b.outputGrads,
            mask: b.mask, gradScale: gradScale, into: UnsafeMutableBufferPointer(start: o, count: b.counts.perSampleGradients))
    }
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

@_cdecl("tengrad_precondition")
public func tengrad_precondition(
    _ p: OpaquePointer?, _ layer: Int32, _ weightGrad: UnsafePointer<Float>?, _ biasGrad: UnsafePointer<Float>?,
    _ weightUpdate: UnsafeMutablePointer<Float>?, _ biasUpdate: UnsafeMutablePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let counts = try h.core.arrayCounts(layer: Int(layer), batch: 0)
        let w = try required(weightGrad, "weight_grad")
        let wu = try required(weightUpdate, "weight_update")
        try h.core.precondition(
            layer: Int(layer), weightGrad: UnsafeBufferPointer(start: w, count: counts.weight),
            biasGrad: biasGrad.map { UnsafeBufferPointer(start: $0, count: counts.bias) },
            weightUpdate: UnsafeMutableBufferPointer(start: wu, count: counts.weight),
            biasUpdate: biasUpdate.map { UnsafeMutableBufferPointer(start: $0, count: counts.bias) })
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
