/// Float32 reductions of the kernel's inner loops, eight lanes at a time with two accumulators.
/// A plain `for` loop over floats is not vectorized (the compiler keeps IEEE summation order) and
/// runs at one add per FP-add latency; these reassociate, which float32 rounding of the GEMMs
/// around them already makes immaterial. Callers accumulate the results in float64.
enum Reduce {
    /// Σ x_i.
    @inline(__always)
    static func sum(_ x: UnsafePointer<Float>, _ n: Int) -> Float {
        let raw = UnsafeRawPointer(x)
        var a = SIMD8<Float>(), b = SIMD8<Float>()
        var i = 0
        while i + 16 <= n {
            a += raw.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
            b += raw.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
            i += 16
        }
        var s = (a + b).sum()
        while i < n {
            s += x[i]
            i += 1
        }
        return s
    }

    /// Σ x_i y_i.
    @inline(__always)
    static func dot(_ x: UnsafePointer<Float>, _ y: UnsafePointer<Float>, _ n: Int) -> Float {
        let rx = UnsafeRawPointer(x), ry = UnsafeRawPointer(y)
        var a = SIMD8<Float>(), b = SIMD8<Float>()
        var i = 0
        while i + 16 <= n {
            a += rx.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
                * ry.loadUnaligned(fromByteOffset: 4 * i, as: SIMD8<Float>.self)
            b += rx.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
                * ry.loadUnaligned(fromByteOffset: 4 * i + 32, as: SIMD8<Float>.self)
            i += 16
        }
        var s = (a + b).sum()
        while i < n {
            s += x[i] * y[i]
            i += 1
        }
        return s
    }

    /// Σ (x_i + c) y_i.
    @inline(__always)
    static func shiftedDot(_ x: UnsafePointer<Float>, plus c: Float, _ y: UnsafePointer<Float>, _ n: Int) -> Float {
        c == 0 ? dot(x, y, n) : dot(x, y, n) + c * sum(y, n)
    }

    /// Σ x_{i·stride} (strided: not vectorized).
    @inline(__always)
    static func stridedSum(_ x: UnsafePointer<Float>, stride: Int, _ n: Int) -> Float {
        var s: Float = 0
        for i in 0..<n { s += x[i * stride] }
        return s
    }
}
