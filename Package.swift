// swift-tools-version:6.0
//
// TENGraD: exact natural-gradient preconditioning (Soori et al., 2021) as a C-ABI shared library
// with a Swift core.
//
//   libtengrad.so  (product "tengrad", dynamic)  the C ABI of include/tengrad.h
//   TENGraD        (product, Swift library)      the core, for `import TENGraD`
import PackageDescription

let package = Package(
    name: "TENGraD",
    products: [
        .library(name: "tengrad", type: .dynamic, targets: ["CTENGraD"]),
        .library(name: "TENGraD", targets: ["TENGraD"]),
        .executable(name: "tengrad-swift-example", targets: ["SwiftExample"]),
        .executable(name: "tengrad-bench", targets: ["Benchmarks"]),
    ],
    targets: [
        // The one seam to BLAS/LAPACK: OpenBLAS's cblas and LAPACKE.
        .systemLibrary(
            name: "COpenBLAS",
            path: "Sources/COpenBLAS",
            providers: [.apt(["libopenblas-dev", "liblapacke-dev"])]
        ),
        // The hand-written header, so the @_cdecl thunks use its own C types.
        .systemLibrary(name: "CTENGraDHeader", path: "include"),
        // The core: all the mathematics, a Swift-native throwing API, no C-ABI concerns.
        .target(name: "TENGraD", dependencies: ["COpenBLAS"]),
        // The C ABI: @_cdecl thunks, the handle box and status mapping; no math.
        .target(name: "CTENGraD", dependencies: ["TENGraD", "CTENGraDHeader"]),
        .executableTarget(name: "SwiftExample", dependencies: ["TENGraD"], path: "examples/swift"),
        .executableTarget(
            name: "Benchmarks",
            dependencies: ["TENGraD", "COpenBLAS"],
            path: "benchmarks/swift"
        ),
        .testTarget(name: "TENGraDTests", dependencies: ["TENGraD"]),
    ]
)
