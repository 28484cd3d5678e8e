import CTENGraDHeader
import TENGraD

// C numbers: statuses and setting codes (they live here, not in the core), and the header's
// structs converted to the core's types.

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

extension TokenMode {
    init?(code: Int32) {
        switch Int(code) {
        case Int(TENGRAD_TOKENS_PER_SEQUENCE): self = .perSequence
        case Int(TENGRAD_TOKENS_PER_TOKEN): self = .perToken
        default: return nil
        }
    }

    var code: Int32 {
        switch self {
        case .perSequence: Int32(TENGRAD_TOKENS_PER_SEQUENCE)
        case .perToken: Int32(TENGRAD_TOKENS_PER_TOKEN)
        }
    }
}

extension DampingMode {
    init?(code: Int32) {
        switch Int(code) {
        case Int(TENGRAD_DAMPING_ABSOLUTE): self = .absolute
        case Int(TENGRAD_DAMPING_RELATIVE): self = .relative
        default: return nil
        }
    }

    var code: Int32 {
        switch self {
        case .absolute: Int32(TENGRAD_DAMPING_ABSOLUTE)
        case .relative: Int32(TENGRAD_DAMPING_RELATIVE)
        }
    }
}

extension LayerKind {
    var code: Int32 {
        switch self {
        case .linear: Int32(TENGRAD_LAYER_LINEAR)
        case .conv2d: Int32(TENGRAD_LAYER_CONV2D)
        case .affine: Int32(TENGRAD_LAYER_AFFINE)
        case .embedding: Int32(TENGRAD_LAYER_EMBEDDING)
        }
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
            size: MemoryLayout<tengrad_conv2d_shape>.stride,  // C's sizeof
            in_channels: Int64(s.inChannels), out_channels: Int64(s.outChannels),
            in_height: Int64(s.inHeight), in_width: Int64(s.inWidth),
            kernel_height: Int64(s.kernelHeight), kernel_width: Int64(s.kernelWidth),
            stride_height: Int64(s.strideHeight), stride_width: Int64(s.strideWidth),
            padding_height: Int64(s.paddingHeight), padding_width: Int64(s.paddingWidth),
            dilation_height: Int64(s.dilationHeight), dilation_width: Int64(s.dilationWidth),
            groups: Int64(s.groups), has_bias: s.hasBias ? 1 : 0)
    }
}

/// The `size` field (a size_t, first) of a caller's extensible struct, whatever version of the
/// struct the caller has: any value from ours up to SIZE_MAX means "fill what fits" (ours).
func callerStructSize(_ p: UnsafeRawPointer) -> Int {
    let size = p.loadUnaligned(as: UInt.self)
    return size > UInt(Int.max) ? Int.max : Int(size)
}

/// A struct the library reads, under the header's size rule: at least this version's fields; a
/// larger one (a newer header) only when every byte past this version's struct (its C sizeof,
/// tail padding included) is zero, so that no setting of a newer caller is silently ignored;
/// sizes above 1024 refused unread (an uninitialized size).
func readCallerStruct<T: BitwiseCopyable>(
    _ p: UnsafePointer<T>?, _ name: String, type: String, start: String
) throws(TENGraDError) -> T {
    let raw = UnsafeRawPointer(try required(p, name))
    let size = callerStructSize(raw), known = MemoryLayout<T>.size, whole = MemoryLayout<T>.stride
    guard size >= known else {
        throw TENGraDError(
            .invalidArgument, "\(name)->size is \(size), smaller than this library's \(type) (\(whole) bytes): start from \(start)")
    }
    guard size <= 1024 else {
        throw TENGraDError(.invalidArgument, "\(name)->size is \(size): not the size of any \(type) (uninitialized?)")
    }
    for offset in whole..<max(whole, size) where raw.load(fromByteOffset: offset, as: UInt8.self) != 0 {
        throw TENGraDError(
            .invalidArgument, "\(name) has fields this library (\(whole) bytes of \(type)) does not know set at byte "
                + "\(offset): a newer header's setting would be ignored")
    }
    return raw.loadUnaligned(as: T.self)
}

/// A struct the library fills: the caller's `size` must cover this version's fields, which are
/// written (`size` included: `value` carries ours); bytes past them are left alone.
func writeCallerStruct<T: BitwiseCopyable>(_ value: T, to p: UnsafeMutablePointer<T>?, _ name: String, type: String) throws(TENGraDError) {
    let o = try required(p, name)
    let ours = MemoryLayout<T>.size, size = callerStructSize(o)
    guard size >= ours else {
        throw TENGraDError(.invalidArgument, "\(name)->size is \(size); set it to sizeof(\(type)) (\(MemoryLayout<T>.stride))")
    }
    withUnsafeBytes(of: value) { UnsafeMutableRawPointer(o).copyMemory(from: $0.baseAddress!, byteCount: ours) }
}
