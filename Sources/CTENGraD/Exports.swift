import CTENGraDHeader
import Synchronization
import TENGraD

// The C ABI of include/tengrad.h: thin @_cdecl thunks over the Swift core. No math lives here.
// Rules of this file: nothing may trap (a trap kills the host process), so no `!`, no `try!`;
// every pointer is checked for NULL and every size comes overflow-checked from the core before a
// buffer is formed; each error becomes a status in `run` and the handle's message.

/// What a `tengrad_preconditioner *` points to: the core object and the last message.
final class Handle {
    let core = Preconditioner()
    /// Set while a call runs on this handle: a second, overlapping call (two threads sharing one
    /// handle, which the header forbids) is refused with TENGRAD_ERROR_STATE instead of
    /// corrupting the state. One uncontended compare-exchange per call.
    let busy = Atomic<Bool>(false)
    /// NUL-terminated copy of the last message, owned here; valid until the next call.
    private var message: UnsafeMutablePointer<CChar>?

    var messagePointer: UnsafePointer<CChar> {
        if let message { return UnsafePointer(message) }
        return staticText("")
    }

    func setMessage(_ text: String) {
        message?.deallocate()
        message = nil
        if text.isEmpty { return }
        var bytes = Array(text.utf8CString)
        let copy = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count)
        copy.initialize(from: &bytes, count: bytes.count)
        message = copy
    }

    deinit { message?.deallocate() }
}

@inline(__always)
private func handle(_ p: OpaquePointer) -> Handle {
    Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

// MARK: - C numbers (statuses and setting codes live here, not in the core)

private let statusOK = tengrad_status(TENGRAD_OK)
private let statusInvalid = tengrad_status(TENGRAD_ERROR_INVALID_ARGUMENT)
private let statusState = tengrad_status(TENGRAD_ERROR_STATE)

extension TENGraDError.Code {
    var status: tengrad_status {
        switch self {
        case .invalidArgument: tengrad_status(TENGRAD_ERROR_INVALID_ARGUMENT)
        case .shape: tengrad_status(TENGRAD_ERROR_SHAPE)
        case .notFinite: tengrad_status(TENGRAD_ERROR_NOT_FINITE)
        case .numerical: tengrad_status(TENGRAD_ERROR_NUMERICAL)
        case .outOfMemory: tengrad_status(TENGRAD_ERROR_OUT_OF_MEMORY)
        case .state: tengrad_status(TENGRAD_ERROR_STATE)
        case .corrupt: tengrad_status(TENGRAD_ERROR_CORRUPT)
        }
    }
}

extension ConvStrategy {
    init?(code: Int32) {
        switch Int(code) {
        case Int(TENGRAD_CONV_AUTO): self = .auto
        case Int(TENGRAD_CONV_FACTORED): self = .factored
        case Int(TENGRAD_CONV_EXPLICIT): self = .explicit
        default: return nil
        }
    }

    var code: Int32 {
        switch self {
        case .auto: Int32(TENGRAD_CONV_AUTO)
        case .factored: Int32(TENGRAD_CONV_FACTORED)
        case .explicit: Int32(TENGRAD_CONV_EXPLICIT)
        }
    }
}

extension SnapshotRepresentation {
    init?(code: Int32) {
        switch Int(code) {
        case Int(TENGRAD_SNAPSHOT_AUTO): self = .auto
        case Int(TENGRAD_SNAPSHOT_RAW): self = .raw
        case Int(TENGRAD_SNAPSHOT_PER_SAMPLE): self = .perSample
        default: return nil
        }
    }

    var code: Int32 {
        switch self {
        case .auto: Int32(TENGRAD_SNAPSHOT_AUTO)
        case .raw: Int32(TENGRAD_SNAPSHOT_RAW)
        case .perSample: Int32(TENGRAD_SNAPSHOT_PER_SAMPLE)
        }
    }
}

extension LayerKind {
    var code: Int32 {
        switch self {
        case .linear: Int32(TENGRAD_LAYER_LINEAR)
        case .conv2d: Int32(TENGRAD_LAYER_CONV2D)
        }
    }
}

/// Runs `body` on the handle, mapping success and every error to a status and the handle's message.
/// A call that overlaps another on the same handle returns TENGRAD_ERROR_STATE and touches
/// nothing (not even the message, which the running call owns).
@inline(__always)
private func run(_ p: OpaquePointer?, _ body: (Handle) throws(TENGraDError) -> Void) -> Int32 {
    guard let p else { return statusInvalid }
    let h = handle(p)
    guard h.busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
        return statusState
    }
    defer { h.busy.store(false, ordering: .releasing) }
    do {
        try body(h)
        h.setMessage("")
        return statusOK
    } catch {
        h.setMessage(error.message)
        return error.code.status
    }
}

@inline(__always)
private func required<T>(_ p: T?, _ name: String) throws(TENGraDError) -> T {
    guard let p else { throw TENGraDError(.invalidArgument, "\(name) is NULL") }
    return p
}

private func staticText(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}

// MARK: - Version and status

@_cdecl("tengrad_version_number")
public func tengrad_version_number() -> Int32 {
    Int32(TENGRAD_VERSION_MAJOR * 10000 + TENGRAD_VERSION_MINOR * 100 + TENGRAD_VERSION_PATCH)
}

@_cdecl("tengrad_status_string")
public func tengrad_status_string(_ status: Int32) -> UnsafePointer<CChar> {
    switch Int(status) {
    case Int(TENGRAD_OK): return staticText("ok")
    case Int(TENGRAD_ERROR_INVALID_ARGUMENT): return staticText("invalid argument")
    case Int(TENGRAD_ERROR_SHAPE): return staticText("shape mismatch or size overflow")
    case Int(TENGRAD_ERROR_NOT_FINITE): return staticText("input contains NaN or Inf")
    case Int(TENGRAD_ERROR_NUMERICAL): return staticText("numerical failure")
    case Int(TENGRAD_ERROR_OUT_OF_MEMORY): return staticText("out of memory")
    case Int(TENGRAD_ERROR_STATE): return staticText("call out of order")
    case Int(TENGRAD_ERROR_CORRUPT): return staticText("corrupt serialized state")
    default: return staticText("unknown status")
    }
}

// MARK: - Handle

@_cdecl("tengrad_create")
public func tengrad_create(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out else { return statusInvalid }
    out.pointee = OpaquePointer(Unmanaged.passRetained(Handle()).toOpaque())
    return statusOK
}

@_cdecl("tengrad_destroy")
public func tengrad_destroy(_ p: OpaquePointer?) {
    guard let p else { return }
    Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(p)).release()
}

@_cdecl("tengrad_last_error")
public func tengrad_last_error(_ p: OpaquePointer?) -> UnsafePointer<CChar> {
    guard let p else { return staticText("NULL tengrad_preconditioner handle") }
    let h = handle(p)
    // While a call runs on the handle its message may be replaced (and the old text freed) at any
    // moment: do not read it (the caller is most likely the thread whose call was refused).
    if h.busy.load(ordering: .acquiring) { return staticText("handle busy (concurrent call)") }
    return h.messagePointer
}

// MARK: - Settings

@_cdecl("tengrad_set_damping")
public func tengrad_set_damping(_ p: OpaquePointer?, _ damping: Double) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try h.core.setDamping(damping) }
}

@_cdecl("tengrad_get_damping")
public func tengrad_get_damping(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Double>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = h.core.damping }
}

@_cdecl("tengrad_set_memory_limit")
public func tengrad_set_memory_limit(_ p: OpaquePointer?, _ bytes: Int64) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try h.core.setMemoryLimit(Int(bytes)) }
}

@_cdecl("tengrad_get_memory_limit")
public func tengrad_get_memory_limit(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = Int64(h.core.memoryLimit) }
}

@_cdecl("tengrad_get_memory_usage")
public func tengrad_get_memory_usage(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = Int64(h.core.memoryInUse) }
}

@_cdecl("tengrad_set_blas_threads")
public func tengrad_set_blas_threads(_ p: OpaquePointer?, _ threads: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try h.core.setBLASThreads(Int(threads)) }
}

@_cdecl("tengrad_get_blas_threads")
public func tengrad_get_blas_threads(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Int32>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = Int32(h.core.blasThreads) }
}

// MARK: - Layers

@_cdecl("tengrad_add_linear")
public func tengrad_add_linear(
    _ p: OpaquePointer?, _ inFeatures: Int64, _ outFeatures: Int64, _ hasBias: Int32,
    _ outLayer: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let out = try required(outLayer, "out_layer")
        guard hasBias == 0 || hasBias == 1 else {
            throw TENGraDError(.invalidArgument, "has_bias must be 0 or 1, got \(hasBias)")
        }
        let id = try h.core.addLinear(inFeatures: Int(inFeatures), outFeatures: Int(outFeatures), bias: hasBias == 1)
        out.pointee = Int32(truncatingIfNeeded: id)
    }
}

@_cdecl("tengrad_add_conv2d")
public func tengrad_add_conv2d(
    _ p: OpaquePointer?, _ shape: UnsafePointer<tengrad_conv2d_shape>?, _ outLayer: UnsafeMutablePointer<Int32>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let s = try required(shape, "shape").pointee
        let out = try required(outLayer, "out_layer")
        guard s.has_bias == 0 || s.has_bias == 1 else {
            throw TENGraDError(.invalidArgument, "has_bias must be 0 or 1, got \(s.has_bias)")
        }
        let id = try h.core.addConv2d(Conv2dShape(s))
        out.pointee = Int32(truncatingIfNeeded: id)
    }
}

@_cdecl("tengrad_set_conv_strategy")
public func tengrad_set_conv_strategy(_ p: OpaquePointer?, _ layer: Int32, _ strategy: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        guard let s = ConvStrategy(code: strategy) else {
            throw TENGraDError(.invalidArgument, "strategy must be TENGRAD_CONV_AUTO, _FACTORED or _EXPLICIT, got \(strategy)")
        }
        try h.core.setConvStrategy(layer: Int(layer), s)
    }
}

@_cdecl("tengrad_set_snapshot_representation")
public func tengrad_set_snapshot_representation(_ p: OpaquePointer?, _ layer: Int32, _ representation: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        guard let r = SnapshotRepresentation(code: representation) else {
            throw TENGraDError(
                .invalidArgument,
                "representation must be TENGRAD_SNAPSHOT_AUTO, _RAW or _PER_SAMPLE, got \(representation)")
        }
        try h.core.setSnapshotRepresentation(layer: Int(layer), r)
    }
}

@_cdecl("tengrad_set_token_mode")
public func tengrad_set_token_mode(_ p: OpaquePointer?, _ layer: Int32, _ mode: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let m: TokenMode
        switch Int(mode) {
        case Int(TENGRAD_TOKENS_PER_SEQUENCE): m = .perSequence
        case Int(TENGRAD_TOKENS_PER_TOKEN): m = .perToken
        default: throw TENGraDError(.invalidArgument, "mode must be TENGRAD_TOKENS_PER_SEQUENCE or _PER_TOKEN, got \(mode)")
        }
        try h.core.setTokenMode(layer: Int(layer), m)
    }
}

@_cdecl("tengrad_get_token_mode")
public func tengrad_get_token_mode(_ p: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<Int32>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let o = try required(out, "out")
        o.pointee = Int32(try h.core.tokenMode(layer: Int(layer)) == .perToken ? TENGRAD_TOKENS_PER_TOKEN : TENGRAD_TOKENS_PER_SEQUENCE)
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

@_cdecl("tengrad_get_conv2d_shape")
public func tengrad_get_conv2d_shape(
    _ p: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<tengrad_conv2d_shape>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let o = try required(out, "out")
        guard case let .conv2d(s) = try h.core.layerDescription(layer: Int(layer)) else {
            throw TENGraDError(.invalidArgument, "layer \(layer) is not a conv2d layer")
        }
        o.pointee = tengrad_conv2d_shape(s)
    }
}

// MARK: - State

@_cdecl("tengrad_save_state")
public func tengrad_save_state(
    _ p: OpaquePointer?, _ buffer: UnsafeMutableRawPointer?, _ capacity: Int, _ size: UnsafeMutablePointer<Int>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let out = try required(size, "size")
        guard let buffer else {
            out.pointee = h.core.stateSize
            return
        }
        guard capacity >= 0 else { throw TENGraDError(.invalidArgument, "capacity overflows") }
        out.pointee = try h.core.saveState(into: UnsafeMutableRawBufferPointer(start: buffer, count: capacity))
    }
}

@_cdecl("tengrad_load_state")
public func tengrad_load_state(_ p: OpaquePointer?, _ buffer: UnsafeRawPointer?, _ size: Int) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try required(buffer, "buffer")
        guard size >= 0 else { throw TENGraDError(.invalidArgument, "size overflows") }
        try h.core.loadState(UnsafeRawBufferPointer(start: b, count: size))
    }
}

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

// MARK: - KL clipping and diagnostics

@_cdecl("tengrad_clear_updates")
public func tengrad_clear_updates(_ p: OpaquePointer?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in h.core.clearUpdates() }
}

@_cdecl("tengrad_kl_clip_factor")
public func tengrad_kl_clip_factor(
    _ p: OpaquePointer?, _ learningRate: Double, _ klClip: Double, _ outNu: UnsafeMutablePointer<Double>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let out = try required(outNu, "out_nu")
        out.pointee = try h.core.klClipFactor(learningRate: learningRate, klClip: klClip)
    }
}

@_cdecl("tengrad_get_layer_stats")
public func tengrad_get_layer_stats(
    _ p: OpaquePointer?, _ layer: Int32, _ out: UnsafeMutablePointer<tengrad_layer_stats>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let o = try required(out, "out")
        let s = try h.core.stats(layer: Int(layer))
        var c = tengrad_layer_stats()
        c.kind = s.kind.code
        c.conv_strategy = s.convStrategy.code
        c.batch = Int64(s.batch)
        c.parameters = Int64(s.parameters)
        c.snapshot_bytes = Int64(s.snapshotBytes)
        c.workspace_bytes = Int64(s.workspaceBytes)
        c.damping = s.damping
        c.jitter = s.jitter
        c.rcond = s.rcond
        c.curvature_flops = s.curvatureFlops
        c.curvature_seconds = s.curvatureSeconds
        c.update_flops = s.updateFlops
        c.update_seconds = s.updateSeconds
        c.update_dot_grad = s.updateDotGrad
        c.conv_factored_flops = s.factoredFlopsEstimate
        c.conv_explicit_flops = s.explicitFlopsEstimate
        o.pointee = c
    }
}

@_cdecl("tengrad_get_snapshot_info")
public func tengrad_get_snapshot_info(
    _ p: OpaquePointer?, _ layer: Int32, _ info: UnsafeMutablePointer<tengrad_snapshot_info>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let o = try required(info, "info")
        let ours = MemoryLayout<tengrad_snapshot_info>.size
        // The caller's struct may be a later, longer version: read its size without assuming ours.
        let size = UnsafeRawPointer(o).loadUnaligned(as: Int.self)
        guard size >= ours else {
            throw TENGraDError(.invalidArgument, "info->size is \(size); set it to sizeof(tengrad_snapshot_info) (\(ours))")
        }
        let s = try h.core.stats(layer: Int(layer))
        var c = tengrad_snapshot_info()
        c.size = ours
        c.representation = s.representation.code
        c.representation_setting = try h.core.snapshotRepresentation(layer: Int(layer)).code
        c.batch = Int64(s.batch)
        c.representation_bytes = Int64(s.representationBytes)
        c.snapshot_bytes = Int64(s.snapshotBytes)
        c.raw_bytes = s.rawBytesEstimate
        c.per_sample_bytes = s.perSampleBytesEstimate
        c.raw_reuse_cost = s.rawReuseCost
        c.per_sample_reuse_cost = s.perSampleReuseCost
        UnsafeMutableRawPointer(o).copyMemory(from: &c, byteCount: ours)
    }
}

// MARK: - Shape conversion (the header's struct ⇄ the core's type; has_bias validated by callers)

extension Conv2dShape {
    init(_ c: tengrad_conv2d_shape) {
        self.init(
            inChannels: Int(c.in_channels), outChannels: Int(c.out_channels),
            inHeight: Int(c.in_height), inWidth: Int(c.in_width),
            kernelHeight: Int(c.kernel_height), kernelWidth: Int(c.kernel_width),
            strideHeight: Int(c.stride_height), strideWidth: Int(c.stride_width),
            paddingHeight: Int(c.padding_height), paddingWidth: Int(c.padding_width),
            dilationHeight: Int(c.dilation_height), dilationWidth: Int(c.dilation_width),
            groups: Int(c.groups), hasBias: c.has_bias == 1)
    }
}

extension tengrad_conv2d_shape {
    init(_ s: Conv2dShape) {
        self.init(
            in_channels: Int64(s.inChannels), out_channels: Int64(s.outChannels),
            in_height: Int64(s.inHeight), in_width: Int64(s.inWidth),
            kernel_height: Int64(s.kernelHeight), kernel_width: Int64(s.kernelWidth),
            stride_height: Int64(s.strideHeight), stride_width: Int64(s.strideWidth),
            padding_height: Int64(s.paddingHeight), padding_width: Int64(s.paddingWidth),
            dilation_height: Int64(s.dilationHeight), dilation_width: Int64(s.dilationWidth),
            groups: Int64(s.groups), has_bias: s.hasBias ? 1 : 0)
    }
}
