import CTENGraDHeader
import TENGraD

// Thunks: registering layers, their settings and shapes.

// MARK: - Layers

/// The common end of the tengrad_add_* thunks: `out_layer` present, `has_bias` 0 or 1, then the
/// layer registered by `add` (given the bias flag) and its id written.
private func register(
    _ outLayer: UnsafeMutablePointer<Int32>?, hasBias: Int32, _ add: (Bool) throws(TENGraDError) -> Int
) throws(TENGraDError) {
    let out = try required(outLayer, "out_layer")
    guard hasBias == 0 || hasBias == 1 else {
        throw TENGraDError(.invalidArgument, "has_bias must be 0 or 1, got \(hasBias)")
    }
    out.pointee = Int32(truncatingIfNeeded: try add(hasBias == 1))
}

@_cdecl("tengrad_add_linear")
public func tengrad_add_linear(
    _ p: OpaquePointer?, _ inFeatures: Int64, _ outFeatures: Int64, _ hasBias: Int32,
    _ outLayer: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try register(outLayer, hasBias: hasBias) { (bias) throws(TENGraDError) in
            try h.core.addLinear(inFeatures: Int(inFeatures), outFeatures: Int(outFeatures), bias: bias)
        }
    }
}

@_cdecl("tengrad_add_conv2d")
public func tengrad_add_conv2d(
    _ p: OpaquePointer?, _ shape: UnsafePointer<tengrad_conv2d_shape>?, _ outLayer: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let s = try readCallerStruct(shape, "shape", type: "tengrad_conv2d_shape", start: "TENGRAD_CONV2D_SHAPE_INIT")
        try register(outLayer, hasBias: s.has_bias) { (_) throws(TENGraDError) in try h.core.addConv2d(Conv2dShape(s)) }
    }
}

@_cdecl("tengrad_add_affine")
public func tengrad_add_affine(
    _ p: OpaquePointer?, _ features: Int64, _ hasBias: Int32, _ outLayer: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try register(outLayer, hasBias: hasBias) { (bias) throws(TENGraDError) in
            try h.core.addAffine(features: Int(features), bias: bias)
        }
    }
}

@_cdecl("tengrad_add_embedding")
public func tengrad_add_embedding(
    _ p: OpaquePointer?, _ vocabulary: Int64, _ features: Int64, _ outLayer: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try register(outLayer, hasBias: 0) { (_) throws(TENGraDError) in
            try h.core.addEmbedding(vocabulary: Int(vocabulary), features: Int(features))
        }
    }
}

/// One layer setting by key (TENGRAD_LAYER_PARAM_*), checked and applied; every single-setting
/// thunk goes through here.
private func setLayerParam(_ h: Handle, _ layer: Int32, _ param: Int32, _ value: Int64) throws(TENGraDError) {
    let code = Int32(exactly: value)
    switch Int(param) {
    case Int(TENGRAD_LAYER_PARAM_CONV_STRATEGY):
        guard let s = code.flatMap(ConvStrategy.init(code:)) else {
            throw TENGraDError(.invalidArgument, "strategy must be TENGRAD_CONV_AUTO, _FACTORED or _EXPLICIT, got \(value)")
        }
        try h.core.setConvStrategy(layer: Int(layer), s)
    case Int(TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION):
        guard let r = code.flatMap(SnapshotRepresentation.init(code:)) else {
            throw TENGraDError(
                .invalidArgument, "representation must be TENGRAD_SNAPSHOT_AUTO, _RAW or _PER_SAMPLE, got \(value)")
        }
        try h.core.setSnapshotRepresentation(layer: Int(layer), r)
    case Int(TENGRAD_LAYER_PARAM_TOKEN_MODE):
        guard let m = code.flatMap(TokenMode.init(code:)) else {
            throw TENGraDError(.invalidArgument, "mode must be TENGRAD_TOKENS_PER_SEQUENCE or _PER_TOKEN, got \(value)")
        }
        try h.core.setTokenMode(layer: Int(layer), m)
    case Int(TENGRAD_LAYER_PARAM_DAMPING_MODE):
        guard let m = code.flatMap(DampingMode.init(code:)) else {
            throw TENGraDError(.invalidArgument, "damping mode must be TENGRAD_DAMPING_ABSOLUTE or _RELATIVE, got \(value)")
        }
        try h.core.setDampingMode(layer: Int(layer), m)
    default:
        throw TENGraDError(.invalidArgument, "unknown layer parameter \(param) (TENGRAD_LAYER_PARAM_*)")
    }
}

@_cdecl("tengrad_set_layer_param")
public func tengrad_set_layer_param(_ p: OpaquePointer?, _ layer: Int32, _ param: Int32, _ value: Int64) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try setLayerParam(h, layer, param, value) }
}

@_cdecl("tengrad_get_layer_param")
public func tengrad_get_layer_param(
    _ p: OpaquePointer?, _ layer: Int32, _ param: Int32, _ out: UnsafeMutablePointer<Int64>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let o = try required(out, "out_value")
        let id = Int(layer)
        switch Int(param) {
        case Int(TENGRAD_LAYER_PARAM_CONV_STRATEGY): o.pointee = Int64(try h.core.convStrategy(layer: id).code)
        case Int(TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION):
            o.pointee = Int64(try h.core.snapshotRepresentation(layer: id).code)
        case Int(TENGRAD_LAYER_PARAM_TOKEN_MODE): o.pointee = Int64(try h.core.tokenMode(layer: id).code)
        case Int(TENGRAD_LAYER_PARAM_DAMPING_MODE): o.pointee = Int64(try h.core.dampingMode(layer: id).code)
        default: throw TENGraDError(.invalidArgument, "unknown layer parameter \(param) (TENGRAD_LAYER_PARAM_*)")
        }
    }
}

@_cdecl("tengrad_set_conv_strategy")
public func tengrad_set_conv_strategy(_ p: OpaquePointer?, _ layer: Int32, _ strategy: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try setLayerParam(h, layer, Int32(TENGRAD_LAYER_PARAM_CONV_STRATEGY), Int64(strategy))
    }
}

@_cdecl("tengrad_set_snapshot_representation")
public func tengrad_set_snapshot_representation(_ p: OpaquePointer?, _ layer: Int32, _ representation: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try setLayerParam(h, layer, Int32(TENGRAD_LAYER_PARAM_SNAPSHOT_REPRESENTATION), Int64(representation))
    }
}

@_cdecl("tengrad_set_token_mode")
public func tengrad_set_token_mode(_ p: OpaquePointer?, _ layer: Int32, _ mode: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try setLayerParam(h, layer, Int32(TENGRAD_LAYER_PARAM_TOKEN_MODE), Int64(mode))
    }
}

@_cdecl("tengrad_get_token_mode")
public func tengrad_get_token_mode(_ p: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Int32>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try required(out, "out").pointee = try h.core.tokenMode(layer: Int(layer)).code
    }
}

@_cdecl("tengrad_layer_count")
public func tengrad_layer_count(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Int32>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        try required(out, "out").pointee = Int32(truncatingIfNeeded: h.core.layerCount)
    }
}

@_cdecl("tengrad_get_linear_shape")
public func tengrad_get_linear_shape(
    _ p: OpaquePointer?, _ layer: Int32, _ inFeatures: UnsafeMutablePointer<Int64>?,
    _ outFeatures: UnsafeMutablePointer<Int64>?, _ hasBias: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let i = try required(inFeatures, "in_features"), o = try required(outFeatures, "out_features")
        let b = try required(hasBias, "has_bias")
        guard case let .linear(inF, outF, bias) = try h.core.layerDescription(layer: Int(layer)) else {
            throw TENGraDError(.invalidArgument, "layer \(layer) is not a linear layer")
        }
        i.pointee = Int64(inF)
        o.pointee = Int64(outF)
        b.pointee = bias ? 1 : 0
    }
}

@_cdecl("tengrad_get_layer_arrays")
public func tengrad_get_layer_arrays(
    _ p: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<tengrad_layer_arrays>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let s = try h.core.arrayShapes(layer: Int(layer))
        var c = tengrad_layer_arrays()
        c.size = MemoryLayout<tengrad_layer_arrays>.size
        /// Writes `dims` into a C int64_t[4] (a tuple in Swift) and returns their count.
        func fill<T>(_ tuple: inout T, _ dims: [Int]) -> Int32 {
            withUnsafeMutableBytes(of: &tuple) { raw in
                for (i, d) in dims.prefix(4).enumerated() { raw.storeBytes(of: Int64(d), toByteOffset: 8 * i, as: Int64.self) }
            }
            return Int32(min(dims.count, 4))
        }
        c.activation_rank = fill(&c.activation_dims, s.activations)
        c.output_grad_rank = fill(&c.output_grad_dims, s.outputGrads)
        c.weight_rank = fill(&c.weight_dims, s.weight)
        c.bias_rank = fill(&c.bias_dims, s.bias ?? [])
        try writeCallerStruct(c, to: out, "out", type: "tengrad_layer_arrays")
    }
}

@_cdecl("tengrad_get_conv2d_shape")
public func tengrad_get_conv2d_shape(
    _ p: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<tengrad_conv2d_shape>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        guard case let .conv2d(s) = try h.core.layerDescription(layer: Int(layer)) else {
            throw TENGraDError(.invalidArgument, "layer \(layer) is not a conv2d layer")
        }
        try writeCallerStruct(tengrad_conv2d_shape(s), to: out, "out", type: "tengrad_conv2d_shape")
    }
}

// MARK: - Diagonal base

@_cdecl("tengrad_set_layer_base")
public func tengrad_set_layer_base(
    _ p: OpaquePointer?, _ layer: Int32, _ weightBase: UnsafePointer<Float>?, _ biasBase: UnsafePointer<Float>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let counts = try h.core.arrayCounts(layer: Int(layer), batch: 0)
        try h.core.setBase(
            layer: Int(layer), weightBase: weightBase.map { UnsafeBufferPointer(start: $0, count: counts.weight) },
            biasBase: biasBase.map { UnsafeBufferPointer(start: $0, count: counts.bias) })
    }
}

@_cdecl("tengrad_get_layer_base")
public func tengrad_get_layer_base(
    _ p: OpaquePointer?, _ layer: Int32, _ outHasBase: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let o = try required(outHasBase, "out_has_base")
        o.pointee = try h.core.hasBase(layer: Int(layer)) ? 1 : 0
    }
}
