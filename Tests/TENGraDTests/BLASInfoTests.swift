import Testing
@testable import TENGraD

/// docs/DESIGN.md §14: what the library reports of its BLAS and CPU, and when it calls the
/// kernels a generic fallback.
@Suite struct BLASInfoTests {
    @Test func kernelSetsMapToTheirInstructionSets() {
        #expect(VectorISA(openBLASCore: "SkylakeX") == .avx512)
        #expect(VectorISA(openBLASCore: "SAPPHIRERAPIDS") == .avx512)
        #expect(VectorISA(openBLASCore: "Haswell") == .avx2)
        #expect(VectorISA(openBLASCore: "Zen") == .avx2)
        #expect(VectorISA(openBLASCore: "Sandybridge") == .avx)
        #expect(VectorISA(openBLASCore: "Prescott") == .sse)
        #expect(VectorISA(openBLASCore: "Core2") == .sse)
        #expect(VectorISA(openBLASCore: "NeoverseN1") == .unknown)
        #expect(VectorISA.sse < .avx2 && .avx2 < .avx512)
    }

    @Test func genericFallbackIsOldKernelsOnAVX2OrBetter() {
        var info = BLASInfo.current
        for (core, cpu, fallback) in [
            ("Prescott", VectorISA.avx512, true), ("Prescott", .avx2, true), ("Sandybridge", .avx2, true),
            ("Haswell", .avx512, false), ("SkylakeX", .avx512, false), ("Prescott", .avx, false),
            ("Prescott", .sse, false), ("NeoverseN1", .unknown, false), ("UnknownFuture", .avx512, false),
        ] {
            info.core = core
            info.coreISA = VectorISA(openBLASCore: core)
            info.cpuISA = cpu
            #expect(info.isGenericFallback == fallback, "\(core) on \(cpu.name)")
        }
    }

    @Test func currentDescribesTheLinkedOpenBLAS() {
        let info = BLASInfo.current
        #expect(info.library == "OpenBLAS")
        #expect(["system", "scipy-openblas32"].contains(info.build))
        #expect(!info.version.isEmpty && info.config.contains(info.version))
        #expect(!info.core.isEmpty && info.threads >= 1)
        #expect(info.coreISA == VectorISA(openBLASCore: info.core))
        #if arch(x86_64)
        #expect(info.cpuISA >= .sse && info.cpuFamily > 0)
        #endif
    }

    @Test func versionIsTheWordAfterOpenBLAS() {
        #expect(BLASInfo.version(fromConfig: "OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Prescott MAX_THREADS=64") == "0.3.21")
        #expect(BLASInfo.version(fromConfig: "") == "")
        #expect(BLASInfo.version(fromConfig: "OpenBLAS") == "")
    }
}
