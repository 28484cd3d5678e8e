import Testing
import TENGraD

/// Dense float64 oracle (docs/DESIGN.md §2): forms each per-sample gradient u_i and F + λI explicitly and
/// solves by Gaussian elimination with partial pivoting. Independent of BLAS/LAPACK.
struct DenseOracle {
    let d: Int
    /// Per-sample gradients, one row of d per sample, flattened as [W | b] row by row.
    let u: [[Double]]

    init(activations a: [Float], outputGrads g: [Float], batch m: Int, inFeatures: Int, outFeatures: Int, bias: Bool, scale: Double) {
        let width = inFeatures + (bias ? 1 : 0)
        d = outFeatures * width
        var rows: [[Double]] = []
        for i in 0..<m {
            var row = [Double](repeating: 0, count: outFeatures * width)
            for r in 0..<outFeatures {
                for c in 0..<width {
                    let ac = c < inFeatures ? Double(a[i * inFeatures + c]) : 1
                    row[r * width + c] = scale * Double(g[i * outFeatures + r]) * ac
                }
            }
            rows.append(row)
        }
        u = rows
    }

    /// From explicit per-sample gradients, one row each.
    init(rows: [[Double]]) {
        u = rows
        d = rows.first?.count ?? 0
    }

    /// Per-sample conv gradients by direct summation over output positions (no unfolding):
    /// Δ_i[o][c][ki][kj] = s Σ_{oh,ow} g_i[o][oh][ow] · x_i[γ(o)·Cg_in + c][oh·sh − ph + ki·dh][ow·sw − pw + kj·dw],
    /// bias entry Σ g_i[o]; rows flattened per output channel as [weight row | bias].
    init(conv s: Conv2dShape, activations x: [Float], outputGrads g: [Float], batch m: Int, scale: Double) {
        let ho = (s.inHeight + 2 * s.paddingHeight - s.dilationHeight * (s.kernelHeight - 1) - 1) / s.strideHeight + 1
        let wo = (s.inWidth + 2 * s.paddingWidth - s.dilationWidth * (s.kernelWidth - 1) - 1) / s.strideWidth + 1
        let cgi = s.inChannels / s.groups, cgo = s.outChannels / s.groups
        var rows: [[Double]] = []
        for i in 0..<m {
            var row: [Double] = []
            for o in 0..<s.outChannels {
                let grp = o / cgo
                var biasSum = 0.0
                for oh in 0..<ho { for ow in 0..<wo { biasSum += Double(g[((i * s.outChannels + o) * ho + oh) * wo + ow]) } }
                for c in 0..<cgi {
                    for ki in 0..<s.kernelHeight {
                        for kj in 0..<s.kernelWidth {
                            var sum = 0.0
                            for oh in 0..<ho {
                                for ow in 0..<wo {
                                    let ih = oh * s.strideHeight - s.paddingHeight + ki * s.dilationHeight
                                    let iw = ow * s.strideWidth - s.paddingWidth + kj * s.dilationWidth
                                    guard ih >= 0, ih < s.inHeight, iw >= 0, iw < s.inWidth else { continue }
                                    let xv = Double(x[((i * s.inChannels + grp * cgi + c) * s.inHeight + ih) * s.inWidth + iw])
                                    sum += Double(g[((i * s.outChannels + o) * ho + oh) * wo + ow]) * xv
                                }
                            }
                            row.append(scale * sum)
                        }
                    }
                }
                if s.hasBias { row.append(scale * biasSum) }
            }
            rows.append(row)
        }
        self.init(rows: rows)
    }

    var meanGradient: [Double] {
        var v = [Double](repeating: 0, count: d)
        for row in u { for k in 0..<d { v[k] += row[k] / Double(u.count) } }
        return v
    }

    /// (F + λI)⁻¹ v with F = (1/m) Σ u_i u_iᵀ; with a base e (in the rows' order), (F + λ diag(e))⁻¹ v.
    func solve(damping: Double, base: [Double]? = nil, _ v: [Double]) -> [Double] {
        let m = Double(u.count)
        var f = [[Double]](repeating: [Double](repeating: 0, count: d + 1), count: d)
        for r in 0..<d {
            for c in 0..<d {
                var sum = 0.0
                for row in u { sum += row[r] * row[c] }
                f[r][c] = sum / m + (r == c ? damping * (base?[r] ?? 1) : 0)
            }
            f[r][d] = v[r]
        }
        for k in 0..<d {
            var p = k
            for r in (k + 1)..<max(d, k + 1) where abs(f[r][k]) > abs(f[p][k]) { p = r }
            f.swapAt(k, p)
            for r in (k + 1)..<max(d, k + 1) {
                let q = f[r][k] / f[k][k]
                for c in k...d { f[r][c] -= q * f[k][c] }
            }
        }
        var x = [Double](repeating: 0, count: d)
        for r in stride(from: d - 1, through: 0, by: -1) {
            var sum = f[r][d]
            for c in (r + 1)..<max(d, r + 1) { sum -= f[r][c] * x[c] }
            x[r] = sum / f[r][r]
        }
        return x
    }
}

/// [W | b] row by row from separate weight [out][in] and bias [out].
func joined(_ w: [Float], _ b: [Float]?, out: Int, in n: Int) -> [Double] {
    var v: [Double] = []
    for r in 0..<out {
        for c in 0..<n { v.append(Double(w[r * n + c])) }
        if let b { v.append(Double(b[r])) }
    }
    return v
}

func relativeError(_ got: [Double], _ want: [Double]) -> Double {
    var num = 0.0, den = 0.0
    for k in 0..<want.count {
        num += (got[k] - want[k]) * (got[k] - want[k])
        den += want[k] * want[k]
    }
    return (num / max(den, .leastNormalMagnitude)).squareRoot()
}

/// Seeded generator (splitmix64) of unit-scale values in [-1, 1).
struct SeededRandom {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> Float {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return Float(z >> 40) / Float(1 << 24) * 2 - 1
    }
    mutating func array(_ n: Int) -> [Float] { (0..<n).map { _ in next() } }
}

/// Runs a call that must throw `code` (the state-unchanged checks come after it in each test).
func refused(_ code: TENGraDError.Code, _ body: () throws(TENGraDError) -> Void) {
    do { try body(); Issue.record("not refused") } catch { #expect(error.code == code) }
}
