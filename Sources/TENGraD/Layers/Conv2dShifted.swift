/// Per-sample weight gradients of a stride-1 convolution without unfolding (docs/DESIGN.md §3).
///
/// With the input of sample i zero-padded to Hp × Wp (X̂_i) and its output gradient laid on the
/// same row pitch Wp (Ĝ_i, zeros in the Wp − W_out columns past each output row), every kernel
/// offset (ki, kj) is one product over q < Q = H_out·Wp:
///
///     U_i[o, c, ki, kj] = Σ_q Ĝ_i[o, q] · X̂_i[c, q + ki·dh·Wp + kj·dw]
///
/// a GEMM (C_g,out × C_g,in × Q) on a shifted view of X̂_i, batched over the samples of a chunk.
/// An extra column q meets a zero of Ĝ_i; a padded channel plane is followed by (kw − 1)·dw
/// zeros so the last shift stays inside it. The unfolding it replaces writes and reads
/// P·L floats per sample (kh·kw times the input); this pads the input and output gradient once.
/// Measured on 2 threads (Xeon, OpenBLAS 0.3.34): 32→32 at 28² 2.2× faster than unfold + one
/// GEMM per sample, 32→32 at 14² 2.0×, 64→64 at 32² 1.6×, 128→128 at 28² 1.3×; slower when
/// Q is short or the channels few (256→256 at 8²: 0.5×; 1→32: 0.6×), hence `worthwhile`.
struct Conv2dShifted: Sendable {
    let paddedHeight: Int, paddedWidth: Int
    /// Floats per padded channel plane, the trailing zeros included.
    let plane: Int
    /// Q = H_out · Wp: the shared length of the products.
    let length: Int
    /// Offset of each kernel position (ki, kj), in the weight's order.
    let offsets: [Int]
    let inChannels: Int, outChannels: Int

    /// The products for `shape`, or nil when they do not apply (a stride above 1) or would be
    /// slower than unfolding (short rows, few input channels) or a size leaves 32-bit BLAS.
    init?(_ s: Conv2dShape, outHeight: Int, outWidth: Int, groupIn: Int, groupOut: Int) {
        guard s.strideHeight == 1, s.strideWidth == 1 else { return nil }
        guard let hp = Self.sum(s.inHeight, 2 &* s.paddingHeight), let wp = Self.sum(s.inWidth, 2 &* s.paddingWidth),
              s.paddingHeight <= Int.max / 4, s.paddingWidth <= Int.max / 4,
              let area = Self.product(hp, wp), let tail = Self.product(s.kernelWidth - 1, s.dilationWidth),
              let plane = Self.sum(area, tail), let length = Self.product(outHeight, wp),
              let xs = Self.product(groupIn, plane), let gs = Self.product(groupOut, length),
              plane <= BLAS.maxDimension, length <= BLAS.maxDimension, xs <= BLAS.maxDimension, gs <= BLAS.maxDimension
        else { return nil }
        // Measured cross-over: the products need rows long enough (Q ≥ 192) and at least 8
        // input channels per group to beat one unfolded GEMM per sample.
        guard Self.worthwhile(length: length, inChannels: groupIn),
              outWidth == wp - (s.kernelWidth - 1) * s.dilationWidth  // stride 1: always
        else { return nil }
        paddedHeight = hp
        paddedWidth = wp
        self.plane = plane
        self.length = length
        var offsets: [Int] = []
        for ki in 0..<s.kernelHeight {
            for kj in 0..<s.kernelWidth {
                offsets.append(ki * s.dilationHeight * wp + kj * s.dilationWidth)
            }
        }
        self.offsets = offsets
        inChannels = groupIn
        outChannels = groupOut
    }

    static func worthwhile(length: Int, inChannels: Int) -> Bool { length >= 192 && inChannels >= 8 }

    private static func sum(_ a: Int, _ b: Int) -> Int? {
        let (r, o) = a.addingReportingOverflow(b)
        return o ? nil : r
    }

    private static func product(_ a: Int, _ b: Int) -> Int? {
        let (r, o) = a.multipliedReportingOverflow(by: b)
        return o ? nil : r
    }

    /// Floats of scratch for `count` samples: their padded inputs and output gradients and the
    /// products of every kernel position.
    func scratch(samples count: Int) -> Int {
        count * (inChannels * plane + outChannels * length + offsets.count * outChannels * inChannels)
            + inChannels * plane  // one sample's transposed input (h·w < plane positions)
    }

    /// Writes the weight part (n × P, rows (o, c, ki, kj) as the weight) of the per-sample
    /// gradients of samples `start..<start+count`, output channels `o0..<o0+n` of group `group`,
    /// to `u + i·ldu + column` for sample i. `scratch` holds `scratch(samples: count)` floats.
    func weightGradients(
        _ geometry: Conv2dGeometry, a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int,
        group: Int, o0: Int, n: Int, into u: UnsafeMutablePointer<Float>, ldu: Int, column: Int,
        scratch: UnsafeMutablePointer<Float>
    ) {
        let s = geometry.shape
        let h = s.inHeight, w = s.inWidth, ph = s.paddingHeight, pw = s.paddingWidth
        let wp = paddedWidth, ci = inChannels, kk = offsets.count
        let hOut = geometry.outHeight, wOut = geometry.outWidth, L = geometry.positions
        let xs = scratch, gs = xs + count * ci * plane, ts = gs + count * n * length
        let hs = ts + kk * count * n * ci
        for li in 0..<count {
            // Channels last: position q's ci inputs at p + q·ci, so every shifted view is a plain
            // row-major Q × ci matrix (ldb = ci) and the products run OpenBLAS's faster NN kernel
            // (measured 95–109 against 78 GFLOP/s on one core for 32×32×812, Xeon, 0.3.34).
            let x = a + (start + li) * geometry.inputSize + group * ci * h * w
            let p = xs + li * ci * plane
            // Zeros: the top rows and the first row's left padding; each row's right padding and
            // the next row's left; the bottom rows and the trailing positions.
            p.update(repeating: 0, count: (ph * wp + pw) * ci)
            for r in 0..<(h - 1) { (p + ((r + ph) * wp + pw + w) * ci).update(repeating: 0, count: 2 * pw * ci) }
            let end = (h - 1 + ph) * wp + pw + w
            (p + end * ci).update(repeating: 0, count: (plane - end) * ci)
            // The sample's ci × (h·w) input transposed whole, then its rows into the padded plane.
            BLAS.transpose(rows: ci, cols: h * w, a: x, lda: h * w, into: hs, ldb: ci)
            for r in 0..<h { (p + ((r + ph) * wp + pw) * ci).update(from: hs + r * w * ci, count: w * ci) }
            let gi = g + (start + li) * geometry.outputSize + (group * outChannels + o0) * L
            for o in 0..<n {
                let d = gs + (li * n + o) * length, src = gi + o * L
                for r in 0..<hOut {
                    (d + r * wp).update(from: src + r * wOut, count: wOut)
                    (d + r * wp + wOut).update(repeating: 0, count: wp - wOut)
                }
            }
        }
        for (k, offset) in offsets.enumerated() {
            BLAS.sgemmBatch(
                transA: false, transB: false, m: n, n: ci, k: length,
                a: gs, lda: length, strideA: n * length, b: xs + offset * ci, ldb: ci, strideB: ci * plane,
                c: ts + k * count * n * ci, ldc: ci, strideC: n * ci, count: count)
        }
        for li in 0..<count {
            let row = u + (start + li) * ldu + column
            for o in 0..<n {
                let dst = row + o * ci * kk
                for k in 0..<kk {
                    let t = ts + (k * count + li) * n * ci + o * ci
                    for c in 0..<ci { dst[c * kk + k] = t[c] }
                }
            }
        }
    }
}
