// The project's benchmark of linear layers (not a test: it prints a table, asserts nothing).
//
// For m ∈ {32, 128, 512} and in = out ∈ {256, 1024, 4096}: seconds per natural_gradient,
// update_curvature and precondition, their GFLOP/s (flops of the SPEC §2 algorithm), and the ratio
// to OpenBLAS sgemm measured in the same run on a product of the same shape as the update's GEMM
// (out×m times m×in). Each time is the median of several timed repetitions.
//
//   tengrad-bench [--quick]
import COpenBLAS
import TENGraD

#if canImport(Glibc)
import Glibc
#endif

func now() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// Median seconds of `body` over repetitions: repeats until ~0.3 s or 25 runs, at least 3.
func measure(_ body: () throws -> Void) rethrows -> Double {
    try body()  // warm-up: workspaces, page faults, BLAS thread start
    var times: [Double] = []
    let start = now()
    while times.count < 3 || (times.count < 25 && now() - start < 0.3) {
        let t0 = now()
        try body()
        times.append(now() - t0)
    }
    times.sort()
    return times[times.count / 2]
}

struct LCG {
    var state: UInt64 = 12345
    mutating func uniform() -> Float {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return Float(state >> 40) / Float(1 << 24) * 2 - 1
    }
}
var rng = LCG()

let quick = CommandLine.arguments.contains("--quick")
let batches = quick ? [32, 128] : [32, 128, 512]
let widths = quick ? [256, 1024] : [256, 1024, 4096]
let threads = getenv("OPENBLAS_NUM_THREADS").map { String(cString: $0) } ?? "default"

print("TENGraD linear-layer benchmark (OPENBLAS_NUM_THREADS=\(threads)); bias on; λ = 0.1")
print("GFLOP/s count the SPEC §2 algorithm: Grams m(m+1)(in+out), Cholesky m³/3, GEMMs 2·m·in·out each")
print("sgemm = OpenBLAS sgemm GFLOP/s on (out×m)·(m×in) in this run; ratio = ours ÷ sgemm\n")
let header = ["m", "in=out", "natgrad s", "GFLOP/s", "ratio", "curv s", "GFLOP/s", "precond s", "GFLOP/s", "ratio", "sgemm GF/s"]
print(header.map { $0.padding(11) }.joined())

for n in widths {
    for m in batches {
        let inF = n, outF = n
        let a = (0..<(m * inF)).map { _ in rng.uniform() }
        let g = (0..<(m * outF)).map { _ in rng.uniform() / Float(m) }
        let vw = (0..<(inF * outF)).map { _ in rng.uniform() }
        let vb = (0..<outF).map { _ in rng.uniform() }
        var uw = [Float](repeating: 0, count: inF * outF)
        var ub = [Float](repeating: 0, count: outF)
        var c = [Float](repeating: 0, count: inF * outF)
        let p = Preconditioner()
        let layer = try p.addLinear(inFeatures: inF, outFeatures: outF, bias: true)

        let tNG = try a.withUnsafeBufferPointer { ap in
            try g.withUnsafeBufferPointer { gp in
                try uw.withUnsafeMutableBufferPointer { wp in
                    try ub.withUnsafeMutableBufferPointer { bp in
                        try measure {
                            try p.naturalGradient(layer: layer, batch: m, activations: ap, outputGrads: gp,
                                                  gradScale: Float(m), weightUpdate: wp, biasUpdate: bp)
                        }
                    }
                }
            }
        }
        let tCurv = try a.withUnsafeBufferPointer { ap in
            try g.withUnsafeBufferPointer { gp in
                try measure { try p.updateCurvature(layer: layer, batch: m, activations: ap, outputGrads: gp, gradScale: Float(m)) }
            }
        }
        let tPre = try vw.withUnsafeBufferPointer { vp in
            try vb.withUnsafeBufferPointer { bp in
                try uw.withUnsafeMutableBufferPointer { wp in
                    try ub.withUnsafeMutableBufferPointer { ubp in
                        try measure { try p.precondition(layer: layer, weightGrad: vp, biasGrad: bp, weightUpdate: wp, biasUpdate: ubp) }
                    }
                }
            }
        }
        let tGemm = measure {
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(outF), Int32(inF), Int32(m), 1,
                        g, Int32(outF), a, Int32(inF), 0, &c, Int32(inF))
        }
        let dm = Double(m), di = Double(inF), dout = Double(outF)
        let fCurv = dm * (dm + 1) * (di + dout) + dm * dm * dm / 3
        let fNG = fCurv + 2 * dm * di * dout
        let fPre = 4 * dm * di * dout
        let gemmRate = 2 * dm * di * dout / tGemm / 1e9
        let ngRate = fNG / tNG / 1e9, curvRate = fCurv / tCurv / 1e9, preRate = fPre / tPre / 1e9
        let row = [
            "\(m)", "\(n)", sci(tNG), fixed(ngRate), fixed(ngRate / gemmRate, 2), sci(tCurv), fixed(curvRate),
            sci(tPre), fixed(preRate), fixed(preRate / gemmRate, 2), fixed(gemmRate),
        ]
        print(row.map { $0.padding(11) }.joined())
    }
}

func fixed(_ x: Double, _ digits: Int = 1) -> String {
    var scale = 1.0
    for _ in 0..<digits { scale *= 10 }
    let r = (x * scale).rounded() / scale
    var s = "\(r)"
    if let dot = s.firstIndex(of: ".") {
        let decimals = s.distance(from: dot, to: s.endIndex) - 1
        if decimals < digits { s += String(repeating: "0", count: digits - decimals) }
    }
    return s
}

func sci(_ x: Double) -> String {
    var e = 0
    var v = x
    while v < 1 && e > -12 { v *= 10; e -= 1 }
    return "\(fixed(v, 2))e\(e)"
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self + " " : self + String(repeating: " ", count: width - count) }
}
