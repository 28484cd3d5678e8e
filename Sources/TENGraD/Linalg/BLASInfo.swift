import CCPU

/// A vector instruction set, ordered: a kernel set written for one level runs on every CPU of that
/// level or above, and leaves the wider units of a higher-level CPU idle.
public enum VectorISA: Int, Comparable, Sendable {
    case unknown = 0, sse = 1, avx = 2, avx2 = 3, avx512 = 4

    public static func < (a: VectorISA, b: VectorISA) -> Bool { a.rawValue < b.rawValue }

    public var name: String {
        switch self {
        case .unknown: "unknown"
        case .sse: "SSE"
        case .avx: "AVX"
        case .avx2: "AVX2"
        case .avx512: "AVX-512"
        }
    }

    /// The instruction set an OpenBLAS kernel set (`openblas_get_corename`) is written for;
    /// `.unknown` for names this table does not list (other architectures, future cores).
    public init(openBLASCore name: String) {
        switch name.lowercased() {
        case "skylakex", "cooperlake", "sapphirerapids": self = .avx512
        case "haswell", "zen": self = .avx2
        case "sandybridge", "bulldozer", "piledriver", "steamroller", "excavator": self = .avx
        case "katmai", "coppermine", "northwood", "prescott", "banias", "atom", "core2", "penryn", "dunnington",
            "nehalem", "athlon", "opteron", "opteron_sse3", "barcelona", "nano", "bobcat":
            self = .sse
        default: self = .unknown
        }
    }
}

/// What the library's BLAS is and how well it fits the CPU (docs/DESIGN.md §14).
public struct BLASInfo: Sendable {
    /// "OpenBLAS".
    public var library: String
    /// Which build is linked: "system" (the distribution's) or "scipy-openblas32" (PyPI's).
    public var build: String
    /// The version OpenBLAS reports, e.g. "0.3.34.481.3".
    public var version: String
    /// The kernel set in use, e.g. "SkylakeX", "Haswell", "Prescott".
    public var core: String
    /// OpenBLAS's configuration string, verbatim.
    public var config: String
    /// OpenBLAS's thread count now.
    public var threads: Int
    /// The instruction set `core` is written for.
    public var coreISA: VectorISA
    /// The widest vector instruction set the CPU and the OS support.
    public var cpuISA: VectorISA
    /// The CPU's brand string, family and model number (x86-64; empty and 0 elsewhere).
    public var cpuModel: String
    public var cpuFamily: Int
    public var cpuModelNumber: Int

    /// True when BLAS runs a generic fallback: kernels below AVX2 on a CPU with AVX2 or AVX-512
    /// (an OpenBLAS that does not know the processor; sgemm runs 2–5× slower).
    public var isGenericFallback: Bool {
        coreISA != .unknown && coreISA < .avx2 && cpuISA >= .avx2
    }

    /// The BLAS this process runs (read now: `threads` follows `openblas_set_num_threads`).
    public static var current: BLASInfo {
        let config = BLAS.config, core = BLAS.coreName
        var brand = [CChar](repeating: 0, count: 49)
        var family: Int32 = 0, model: Int32 = 0
        tengrad_cpu_model(&brand, &family, &model)
        let cpuModel = String(decoding: brand.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return BLASInfo(
            library: "OpenBLAS", build: BLAS.build, version: Self.version(fromConfig: config), core: core,
            config: config, threads: BLAS.threads, coreISA: VectorISA(openBLASCore: core),
            cpuISA: VectorISA(rawValue: Int(tengrad_cpu_vector_isa())) ?? .unknown,
            cpuModel: Self.trimmed(cpuModel), cpuFamily: Int(family), cpuModelNumber: Int(model))
    }

    /// "OpenBLAS 0.3.21 DYNAMIC_ARCH ..." → "0.3.21".
    static func version(fromConfig config: String) -> String {
        let words = config.split(separator: " ")
        guard let i = words.firstIndex(where: { $0 == "OpenBLAS" }), i + 1 < words.count else { return "" }
        return String(words[i + 1])
    }

    static func trimmed(_ s: String) -> String {
        String(s.split(separator: " ", omittingEmptySubsequences: true).joined(separator: " "))
    }
}
