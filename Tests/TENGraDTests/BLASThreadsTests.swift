import Testing
@testable import TENGraD

/// OpenBLAS's thread count is process-wide; handles with their own count (`setBLASThreads`) used
/// from different threads at once may see each other's count while their calls overlap, but never
/// leave it changed (docs/DESIGN.md §8).
@Suite struct BLASThreadsTests {
    @Test func overlappingCountsRestoreTheCountFound() throws {
        let found = BLAS.threads
        let counts = [1, found + 1]
        onTwoThreads { part in
            for _ in 0..<200_000 {
                BLAS.withThreads(counts[part]) {
                    BLAS.withThreads(counts[1 - part]) { _ = BLAS.threads }
                }
            }
        }
        #expect(BLAS.threads == found)

        var rng = SeededRandom(5)
        let m = 6, x = rng.array(m * 8), g = rng.array(m * 4), v = rng.array(4 * 8)
        var failures = [0, 0]
        failures.withUnsafeMutableBufferPointer { failures in
            onTwoThreads { part in
                do {
                    let p = Preconditioner()
                    try p.setBLASThreads(counts[part])
                    let layer = try p.addLinear(inFeatures: 8, outFeatures: 4, bias: false)
                    for _ in 0..<500 {
                        try p.updateCurvature(layer: layer, batch: m, activations: x, outputGrads: g, gradScale: 1)
                        _ = try p.precondition(layer: layer, weightGrad: v, biasGrad: nil)
                    }
                } catch {
                    failures[part] += 1
                }
            }
        }
        #expect(failures == [0, 0])
        #expect(BLAS.threads == found)
    }
}
