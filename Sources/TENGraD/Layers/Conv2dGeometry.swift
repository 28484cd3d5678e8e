/// The shape of a 2-D convolution, as PyTorch's `nn.Conv2d` defines it (mirrors
/// `tengrad_conv2d_shape`). Zero padding on both sides; `groups` divides both channel counts
/// (`groups == inChannels` is a depthwise convolution).
public struct Conv2dShape: Sendable, Equatable {
    public var inChannels: Int, outChannels: Int
    public var inHeight: Int, inWidth: Int
    public var kernelHeight: Int, kernelWidth: Int
    public var strideHeight: Int = 1, strideWidth: Int = 1
    public var paddingHeight: Int = 0, paddingWidth: Int = 0
    public var dilationHeight: Int = 1, dilationWidth: Int = 1
    public var groups: Int = 1
    public var hasBias: Bool = true

    public init(
        inChannels: Int, outChannels: Int, inHeight: Int, inWidth: Int, kernelHeight: Int, kernelWidth: Int,
        strideHeight: Int = 1, strideWidth: Int = 1, paddingHeight: Int = 0, paddingWidth: Int = 0,
        dilationHeight: Int = 1, dilationWidth: Int = 1, groups: Int = 1, hasBias: Bool = true
    ) {
        self.inChannels = inChannels
        self.outChannels = outChannels
        self.inHeight = inHeight
        self.inWidth = inWidth
        self.kernelHeight = kernelHeight
        self.kernelWidth = kernelWidth
        self.strideHeight = strideHeight
        self.strideWidth = strideWidth
        self.paddingHeight = paddingHeight
        self.paddingWidth = paddingWidth
        self.dilationHeight = dilationHeight
        self.dilationWidth = dilationWidth
        self.groups = groups
        self.hasBias = hasBias
    }
}

/// A 2-D convolution as patches × positions (docs/DESIGN.md §3): per sample and group, the patch
/// matrix is the im2col unfolding of the input (P = (C_in/groups)·kh·kw rows ordered as the
/// weight, L = H_out·W_out columns), unfolded on demand; the output gradients are the caller's
/// [C_out][L] rows (channel-major). With groups > 1 the per-sample gradient is the concatenation
/// of the per-group ones, so the Gram is the sum of per-group Grams — exact. No spatial averaging.
///
/// All products are overflow-checked here, once, so the kernel's loops use plain arithmetic.
struct Conv2dGeometry: BlockGeometry {
    let shape: Conv2dShape
    let outHeight: Int, outWidth: Int
    /// L, output positions per sample.
    let positions: Int
    /// Channels per group, in and out.
    let groupIn: Int, groupOut: Int
    /// P = (C_in/groups)·kh·kw, rows of one group's patch matrix (without the bias row).
    let patch: Int
    /// Numbers per sample of the activations (C_in·H·W) and of the output gradients (C_out·L).
    let inputSize: Int, outputSize: Int
    let dims: BlockDims
    /// Stride-1 layers where products on shifted views beat unfolding (`Conv2dShifted`).
    let shifted: Conv2dShifted?

    init(_ s: Conv2dShape) throws(TENGraDError) {
        func positive(_ value: Int, _ name: String) throws(TENGraDError) {
            guard value > 0 else { throw .invalid("\(name) must be positive, got \(value)") }
        }
        try positive(s.inChannels, "in_channels")
        try positive(s.outChannels, "out_channels")
        try positive(s.inHeight, "in_height")
        try positive(s.inWidth, "in_width")
        try positive(s.kernelHeight, "kernel_height")
        try positive(s.kernelWidth, "kernel_width")
        try positive(s.strideHeight, "stride_height")
        try positive(s.strideWidth, "stride_width")
        try positive(s.dilationHeight, "dilation_height")
        try positive(s.dilationWidth, "dilation_width")
        try positive(s.groups, "groups")
        guard s.paddingHeight >= 0 else { throw .invalid("padding_height must be >= 0, got \(s.paddingHeight)") }
        guard s.paddingWidth >= 0 else { throw .invalid("padding_width must be >= 0, got \(s.paddingWidth)") }
        guard s.inChannels % s.groups == 0 else {
            throw .invalid("groups (\(s.groups)) must divide in_channels (\(s.inChannels))")
        }
        guard s.outChannels % s.groups == 0 else {
            throw .invalid("groups (\(s.groups)) must divide out_channels (\(s.outChannels))")
        }
        func outSize(_ size: Int, _ pad: Int, _ dil: Int, _ k: Int, _ stride: Int, _ axis: String) throws(TENGraDError) -> Int {
            let padded = try checkedSum(size, try checkedProduct(2, pad, what: "padding_\(axis)"), what: "in_\(axis) + 2·padding_\(axis)")
            let span = try checkedSum(try checkedProduct(dil, k - 1, what: "dilation_\(axis) · (kernel_\(axis) − 1)"), 1, what: "kernel span")
            guard span <= padded else {
                throw .invalid("kernel_\(axis) \(k) with dilation_\(axis) \(dil) spans \(span), more than the padded in_\(axis) \(padded)")
            }
            return (padded - span) / stride + 1
        }
        outHeight = try outSize(s.inHeight, s.paddingHeight, s.dilationHeight, s.kernelHeight, s.strideHeight, "height")
        outWidth = try outSize(s.inWidth, s.paddingWidth, s.dilationWidth, s.kernelWidth, s.strideWidth, "width")
        positions = try checkedProduct(outHeight, outWidth, what: "H_out × W_out")
        groupIn = s.inChannels / s.groups
        groupOut = s.outChannels / s.groups
        patch = try checkedProduct(groupIn, s.kernelHeight, s.kernelWidth, what: "(in_channels/groups) × kernel_height × kernel_width")
        inputSize = try checkedProduct(s.inChannels, s.inHeight, s.inWidth, what: "in_channels × in_height × in_width")
        outputSize = try checkedProduct(s.outChannels, positions, what: "out_channels × H_out × W_out")
        dims = try BlockDims(
            groups: s.groups, patch: patch, groupOut: groupOut, positions: positions, hasBias: s.hasBias,
            inputSize: inputSize, outputSize: outputSize, positionMajor: false)
        shifted = Conv2dShifted(s, outHeight: outHeight, outWidth: outWidth, groupIn: groupIn, groupOut: groupOut)
        shape = s
    }

    static let kind = LayerKind.conv2d
    var takesTokens: Bool { false }
    var reportsStrategy: Bool { true }
    var description: Preconditioner.Layer { .conv2d(shape) }
    var arrayShapes: Preconditioner.ArrayShapes {
        let s = shape
        return .init(
            activations: [s.inChannels, s.inHeight, s.inWidth], outputGrads: [s.outChannels, outHeight, outWidth],
            weight: [s.outChannels, s.inChannels / s.groups, s.kernelHeight, s.kernelWidth],
            bias: s.hasBias ? [s.outChannels] : nil)
    }

    var tokens: Int { 1 }

    func overTokens(_ tokens: Int) throws(TENGraDError) -> any BlockGeometry {
        guard tokens == 1 else { throw .invalid("tokens apply to linear and affine layers; a conv2d layer takes tokens = 1, got \(tokens)") }
        return self
    }

    func patchScratch(samples count: Int) -> Int { patch * positions * count }

    func formScratch(samples count: Int) -> Int { shifted?.scratch(samples: count) ?? patchScratch(samples: count) }

    /// The shifted products are batched over samples: 8 per chunk keep both BLAS threads busy.
    var formChunkFloor: Int { shifted == nil ? 1 : 8 }

    func formWeightGradients(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int, group: Int, o0: Int, n: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int, column: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Bool {
        guard let shifted else { return false }
        shifted.weightGradients(
            self, a: a, g: g, start: start, count: count, group: group, o0: o0, n: n, into: u, ldu: ldu, column: column,
            scratch: scratch)
        return true
    }

    /// Unfolds the samples side by side: P rows of count·L columns.
    func patches(
        _ a: UnsafePointer<Float>, start: Int, count: Int, group: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Block {
        let ld = count * positions
        for li in 0..<count { unfold(sample: a + (start + li) * inputSize, group: group, into: scratch + li * positions, ld: ld) }
        return Block(base: scratch, ld: ld, positionMajor: false)
    }

    /// Writes the patch matrix Ĩ of one sample restricted to group `group` — P rows ordered
    /// (channel, ki, kj) as the weight is, L columns ordered (oh, ow) — into `dst` with row stride
    /// `ld` (so several samples can sit side by side). Zero padding reads as 0.
    func unfold(sample x: UnsafePointer<Float>, group: Int, into dst: UnsafeMutablePointer<Float>, ld: Int) {
        let s = shape
        let h = s.inHeight, w = s.inWidth, ow = outWidth
        for c in 0..<groupIn {
            let plane = x + (group * groupIn + c) * h * w
            for ki in 0..<s.kernelHeight {
                for kj in 0..<s.kernelWidth {
                    let row = dst + ((c * s.kernelHeight + ki) * s.kernelWidth + kj) * ld
                    let colOffset = kj * s.dilationWidth - s.paddingWidth
                    // Output columns whose input column lies inside the image: iw = ow·sw + colOffset.
                    // ⌈−colOffset / stride⌉ without forming −colOffset + stride (which may overflow).
                    let first = colOffset >= 0 ? 0 : (-colOffset - 1) / s.strideWidth + 1
                    let lastExclusive = min(ow, colOffset >= w ? 0 : (w - 1 - colOffset) / s.strideWidth + 1)
                    for oh in 0..<outHeight {
                        let out = row + oh * ow
                        let ih = oh * s.strideHeight - s.paddingHeight + ki * s.dilationHeight
                        if ih < 0 || ih >= h || first >= lastExclusive {
                            out.update(repeating: 0, count: ow)
                            continue
                        }
                        let src = plane + ih * w + colOffset
                        if first > 0 { out.update(repeating: 0, count: first) }
                        if s.strideWidth == 1 {
                            (out + first).update(from: src + first, count: lastExclusive - first)
                        } else {
                            for o in first..<lastExclusive { out[o] = src[o * s.strideWidth] }
                        }
                        if lastExclusive < ow { (out + lastExclusive).update(repeating: 0, count: ow - lastExclusive) }
                    }
                }
            }
        }
    }
}

extension Conv2dGeometry {
    static let stateCode: UInt32 = 2
    /// i64 × 12 (channels in/out, height, width, kernel, stride, padding, dilation — each height
    /// then width), i64 groups, u32 bias.
    func writeShape(_ w: inout StateWriter) {
        let s = shape
        for v in [s.inChannels, s.outChannels, s.inHeight, s.inWidth, s.kernelHeight, s.kernelWidth,
                  s.strideHeight, s.strideWidth, s.paddingHeight, s.paddingWidth, s.dilationHeight,
                  s.dilationWidth, s.groups] { w.i64(v) }
        w.bool(s.hasBias)
    }
    static func readShape(_ r: inout StateReader) throws(TENGraDError) -> any BlockGeometry {
        var v: [Int] = []
        for _ in 0..<13 { v.append(try r.i64("conv shape")) }
        return try Conv2dGeometry(Conv2dShape(
            inChannels: v[0], outChannels: v[1], inHeight: v[2], inWidth: v[3], kernelHeight: v[4],
            kernelWidth: v[5], strideHeight: v[6], strideWidth: v[7], paddingHeight: v[8], paddingWidth: v[9],
            dilationHeight: v[10], dilationWidth: v[11], groups: v[12], hasBias: try r.bool("bias flag")))
    }
}
