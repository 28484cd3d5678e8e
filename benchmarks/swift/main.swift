// The project's benchmark of linear layers (not a test: it prints a table, asserts nothing).
//
// For m ∈ {32, 128, 512} and in = out ∈ {256, 1024, 4096}: seconds per natural_gradient,
// update_curvature and precondition, their GFLOP/s (flops of the docs/DESIGN.md §2 algorithm), and the ratio
// to a floor measured in the same run: the precondition's two OpenBLAS GEMMs alone, timed in
// alternating rounds with the precondition out of place and in place. Each time is the median of
// several repetitions.
//
//   tengrad-bench [--quick] [--linear-only | --conv-only] [--size m,n]
#if ScipyOpenBLAS
import CScipyOpenBLAS
#else
import COpenBLAS
#endif
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

/// Medians of `body(0)`, …, `body(count − 1)` timed in alternating rounds (at least 9 rounds, then
/// up to 31 within about 1.5 s); `prepare` runs untimed before each round. Bodies compared in one
/// round see the same drift of a shared machine.
func alternatingMedians(_ count: Int, prepare: () -> Void = {}, _ body: (Int) throws -> Void) rethrows -> [Double] {
    prepare()
    for k in 0..<count { try body(k) }  // warm-up
    var times = [[Double]](repeating: [], count: count)
    let start = now()
    while times[0].count < 9 || (times[0].count < 31 && now() - start < 1.5) {
        prepare()
        for k in 0..<count {
            let t0 = now()
            try body(k)
            times[k].append(now() - t0)
        }
    }
    return times.map { $0.sorted()[$0.count / 2] }
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
let runLinear = !CommandLine.arguments.contains("--conv-only")
let runConv = !CommandLine.arguments.contains("--linear-only")
/// `--size m,n`: one linear size only (for profiling).
let onlySize: (Int, Int)? = CommandLine.arguments.firstIndex(of: "--size").flatMap { i in
    i + 1 < CommandLine.arguments.count ? CommandLine.arguments[i + 1] : nil
}.flatMap { arg -> (Int, Int)? in
    let parts = arg.split(separator: ",").compactMap { Int($0) }
    return parts.count == 2 ? (parts[0], parts[1]) : nil
}
let batches = onlySize.map { [$0.0] } ?? (quick ? [32, 128] : [32, 128, 512])
let widths = onlySize.map { [$0.1] } ?? (quick ? [256, 1024] : [256, 1024, 4096])
let threads = getenv("OPENBLAS_NUM_THREADS").map { String(cString: $0) } ?? "default"
/// OpenBLAS's idle workers spin 2^this many cycles after each threaded call (read at its load;
/// 28 when unset): the README's setting for C and Swift programs, and the Python binding's, is 20.
let spin = getenv("OPENBLAS_THREAD_TIMEOUT").map { String(cString: $0) } ?? "unset: 28"

let blas = BLASInfo.current
print("CPU: \(blas.cpuModel) (family \(blas.cpuFamily) model \(blas.cpuModelNumber), \(blas.cpuISA.name)); "
      + "BLAS: \(blas.library) \(blas.version) (\(blas.build)), core \(blas.core) (\(blas.coreISA.name)"
      + (blas.isGenericFallback ? ", GENERIC FALLBACK" : "") + "), \(blas.threads) thread(s)\n")
if runLinear {
print("TENGraD linear-layer benchmark (OPENBLAS_NUM_THREADS=\(threads), OPENBLAS_THREAD_TIMEOUT=\(spin)); bias on; λ = 0.1")
print("GFLOP/s count the docs/DESIGN.md §2 algorithm: Grams m(m+1)(in+out), Cholesky m³/3, GEMMs 2·m·in·out each")
print("floor = GFLOP/s of the precondition's two GEMMs alone (V·A and C += Gᵀ·A, OpenBLAS, timed in alternating")
print("rounds with the precondition out of place and in place); ratio = ours ÷ floor; in place = the precondition's")
print("ratio with the update written over the gradient (the in-place call: no copy)\n")
let header = ["m", "in=out", "natgrad s", "GFLOP/s", "ratio", "curv s", "GFLOP/s", "precond s", "GFLOP/s", "ratio", "in place", "floor GF/s"]
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
        // Out of place, in place (the update written over the gradient, as the PyTorch integration
        // does) and the floor — the precondition's two GEMMs alone, V·A (out×in·in×m) and C += Gᵀ·A
        // (out×m·m×in) — timed in alternating rounds, so drifting load on a shared machine affects
        // all three alike. The in-place gradient is restored (untimed) before each round: updates
        // written over it would grow by up to 1/λ per call.
        var inPlaceW = vw, inPlaceB = vb
        var vaProduct = [Float](repeating: 0, count: outF * m)
        let medians = try vw.withUnsafeBufferPointer { vp in
            try vb.withUnsafeBufferPointer { bp in
                try uw.withUnsafeMutableBufferPointer { uwp in
                    try ub.withUnsafeMutableBufferPointer { ubp in
                        try inPlaceW.withUnsafeMutableBufferPointer { wp in
                            try inPlaceB.withUnsafeMutableBufferPointer { ibp in
                                try alternatingMedians(3, prepare: {
                                    _ = wp.update(from: vw)
                                    _ = ibp.update(from: vb)
                                }) { k in
                                    switch k {
                                    case 0:
                                        try p.precondition(layer: layer, weightGrad: vp, biasGrad: bp, weightUpdate: uwp, biasUpdate: ubp)
                                    case 1:
                                        try p.precondition(layer: layer, weightGrad: UnsafeBufferPointer(wp),
                                                           biasGrad: UnsafeBufferPointer(ibp), weightUpdate: wp, biasUpdate: ibp)
                                    default:
                                        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(outF), Int32(m), Int32(inF), 1,
                                                    vw, Int32(inF), a, Int32(inF), 0, &vaProduct, Int32(m))
                                        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(outF), Int32(inF), Int32(m), 1,
                                                    g, Int32(outF), a, Int32(inF), 1, &c, Int32(inF))
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        let (tPre, tIn, tFloor) = (medians[0], medians[1], medians[2])
        let dm = Double(m), di = Double(inF), dout = Double(outF)
        let fCurv = dm * (dm + 1) * (di + dout) + dm * dm * dm / 3
        let fNG = fCurv + 2 * dm * di * dout
        let fPre = 4 * dm * di * dout
        let gemmRate = fPre / tFloor / 1e9
        let ngRate = fNG / tNG / 1e9, curvRate = fCurv / tCurv / 1e9, preRate = fPre / tPre / 1e9, inRate = fPre / tIn / 1e9
        let row = [
            "\(m)", "\(n)", sci(tNG), fixed(ngRate), fixed(ngRate / gemmRate, 2), sci(tCurv), fixed(curvRate),
            sci(tPre), fixed(preRate), fixed(preRate / gemmRate, 2), fixed(inRate / gemmRate, 2), fixed(gemmRate),
        ]
        print(row.map { $0.padding(11) }.joined())
    }
}
}

// MARK: - Convolutions

/// Seconds of one curvature update with a forced strategy. When the flop model predicts more than
/// `cap` seconds at the full batch, times a smaller batch and extrapolates by (m/m')², the Gram's
/// growth in m (marked with "*").
func outputPositions(_ s: Conv2dShape) -> (Int, Int) {
    ((s.inHeight + 2 * s.paddingHeight - s.dilationHeight * (s.kernelHeight - 1) - 1) / s.strideHeight + 1,
     (s.inWidth + 2 * s.paddingWidth - s.dilationWidth * (s.kernelWidth - 1) - 1) / s.strideWidth + 1)
}

func convCurvatureSeconds(_ shape: Conv2dShape, batch m: Int, strategy: ConvStrategy, estimate: Double, rng: inout LCG) throws -> (Double, Bool) {
    let cap = 2e11  // flops: about a second at this machine's sgemm rate
    var mm = m
    while mm > 2 && estimate * Double(mm * mm) / Double(m * m) > cap { mm /= 2 }
    let (ho, wo) = outputPositions(shape)
    let x = (0..<(mm * shape.inChannels * shape.inHeight * shape.inWidth)).map { _ in rng.uniform() }
    let g = (0..<(mm * shape.outChannels * ho * wo)).map { _ in rng.uniform() / Float(mm) }
    let p = Preconditioner()
    let layer = try p.addConv2d(shape)
    try p.setConvStrategy(layer: layer, strategy)
    let t = try x.withUnsafeBufferPointer { xp in
        try g.withUnsafeBufferPointer { gp in
            try measure { try p.updateCurvature(layer: layer, batch: mm, activations: xp, outputGrads: gp, gradScale: Float(mm)) }
        }
    }
    return (t * Double(m * m) / Double(mm * mm), mm != m)
}

/// Seconds of one `precondition` from a snapshot of the given representation.
func preconditionSeconds(
    _ p: Preconditioner, _ id: Int, m: Int, x: [Float], g: [Float], v: [Float], vb: [Float], _ representation: SnapshotRepresentation
) throws -> Double {
    try p.setSnapshotRepresentation(layer: id, representation)
    try p.updateCurvature(layer: id, batch: m, activations: x, outputGrads: g, gradScale: Float(m))
    var out = [Float](repeating: 0, count: v.count), outB = [Float](repeating: 0, count: vb.count)
    return try v.withUnsafeBufferPointer { vp in
        try vb.withUnsafeBufferPointer { vbp in
            try out.withUnsafeMutableBufferPointer { op in
                try outB.withUnsafeMutableBufferPointer { obp in
                    try measure { try p.precondition(layer: id, weightGrad: vp, biasGrad: vbp, weightUpdate: op, biasUpdate: obp) }
                }
            }
        }
    }
}

if runConv {
    let m = quick ? 32 : 128
    let layers: [(String, Conv2dShape)] = [
        ("1→32 28²", Conv2dShape(inChannels: 1, outChannels: 32, inHeight: 28, inWidth: 28, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)),
        ("32→32 28²", Conv2dShape(inChannels: 32, outChannels: 32, inHeight: 28, inWidth: 28, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)),
        ("FMNIST conv1 1→128 28²", Conv2dShape(inChannels: 1, outChannels: 128, inHeight: 28, inWidth: 28, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)),
        ("FMNIST conv2 128→128 28²", Conv2dShape(inChannels: 128, outChannels: 128, inHeight: 28, inWidth: 28, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)),
        ("ResNet 64→64 32²", Conv2dShape(inChannels: 64, outChannels: 64, inHeight: 32, inWidth: 32, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)),
        ("ResNet 256→256 8²", Conv2dShape(inChannels: 256, outChannels: 256, inHeight: 8, inWidth: 8, kernelHeight: 3, kernelWidth: 3, paddingHeight: 1, paddingWidth: 1)),
        ("1×1 512→512 4²", Conv2dShape(inChannels: 512, outChannels: 512, inHeight: 4, inWidth: 4, kernelHeight: 1, kernelWidth: 1)),
    ]
    print("\nTENGraD conv2d benchmark, batch \(m), bias on (conv2 and conv3 of the paper's ConvNet are both 128→128 on 28²: listed once)")
    print("curvature = one update_curvature (Gram + Cholesky) per strategy; precondition (the reuse step) from a raw")
    print("snapshot and from kept per-sample gradients U; rep = the representation the cost model picks")
    print("(* = measured at a smaller batch and scaled by (m/m')², the Gram's growth; the factored Gram")
    print("   grows with L² and would take minutes on the large-L layers)\n")
    let head = ["layer", "L", "factored s", "explicit s", "model picks", "faster", "prec raw s", "prec U s", "rep", "natgrad s", "U MB"]
    print(head.enumerated().map { $0.element.padding($0.offset == 0 ? 27 : 13) }.joined())
    for (name, shape) in layers {
        let probe = Preconditioner()
        let id = try probe.addConv2d(shape)
        let (ho, wo) = outputPositions(shape)
        let x = (0..<(m * shape.inChannels * shape.inHeight * shape.inWidth)).map { _ in rng.uniform() }
        let g = (0..<(m * shape.outChannels * ho * wo)).map { _ in rng.uniform() / Float(m) }
        let counts = try probe.arrayCounts(layer: id, batch: m)
        let v = (0..<counts.weight).map { _ in rng.uniform() }, vb = (0..<counts.bias).map { _ in rng.uniform() }
        var out = [Float](repeating: 0, count: counts.weight), outB = [Float](repeating: 0, count: counts.bias)
        // Precondition from each representation; then the model's choice from an automatic update
        // and the one-call natural gradient.
        let tRaw = try preconditionSeconds(probe, id, m: m, x: x, g: g, v: v, vb: vb, .raw)
        let tU = try preconditionSeconds(probe, id, m: m, x: x, g: g, v: v, vb: vb, .perSample)
        try probe.setSnapshotRepresentation(layer: id, .auto)
        let tNat = try x.withUnsafeBufferPointer { xp in
            try g.withUnsafeBufferPointer { gp in
                try out.withUnsafeMutableBufferPointer { op in
                    try outB.withUnsafeMutableBufferPointer { obp in
                        try measure {
                            try probe.naturalGradient(layer: id, batch: m, activations: xp, outputGrads: gp, gradScale: Float(m), weightUpdate: op, biasUpdate: obp)
                        }
                    }
                }
            }
        }
        let st = try probe.stats(layer: id)
        let (tf, fx) = try convCurvatureSeconds(shape, batch: m, strategy: .factored, estimate: st.factoredFlopsEstimate, rng: &rng)
        let (te, ex) = try convCurvatureSeconds(shape, batch: m, strategy: .explicit, estimate: st.explicitFlopsEstimate, rng: &rng)
        let faster: ConvStrategy = tf < te ? .factored : .explicit
        let row = [
            name, "\(ho * wo)", sci(tf) + (fx ? "*" : ""), sci(te) + (ex ? "*" : ""), "\(st.convStrategy)",
            faster == st.convStrategy ? "yes" : "no (\(faster))", sci(tRaw), sci(tU),
            st.representation == .perSample ? "U" : "raw", sci(tNat), fixed(st.perSampleBytesEstimate / 1e6, 1),
        ]
        print(row.enumerated().map { $0.element.padding($0.offset == 0 ? 27 : 13) }.joined())
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
    while v >= 10 { v /= 10; e += 1 }
    return "\(fixed(v, 2))e\(e)"
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self + " " : self + String(repeating: " ", count: width - count) }
}
