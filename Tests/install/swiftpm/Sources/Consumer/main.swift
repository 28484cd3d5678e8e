// `import TENGraD` from another package: one natural-gradient call against a hand-computed case
// (a 1→1 layer, one sample: u = s·g·a = 6, F = 36, update = 6 / (36 + λ)).
import Glibc
import TENGraD

let p = Preconditioner()
do {
    try p.setDamping(0.5)
    let layer = try p.addLinear(inFeatures: 1, outFeatures: 1, bias: false)
    let (w, _) = try p.naturalGradient(layer: layer, batch: 1, activations: [3], outputGrads: [1], gradScale: 2)
    let want = 6.0 / 36.5
    guard abs(Double(w[0]) - want) <= 1e-6 * want else {
        print("natural gradient \(w[0]), want \(want)")
        exit(1)
    }
    let blas = BLASInfo.current
    print("SwiftPM consumer: natural gradient \(w[0]) (want \(want)); BLAS build \(blas.build), core \(blas.core)")
} catch {
    print("failed: \(error)")
    exit(1)
}
