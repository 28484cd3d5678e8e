// swift-tools-version:6.1
//
// TENGraD: exact natural-gradient preconditioning (Soori et al., 2021) as a C-ABI shared library
// with a Swift core.
//
//   libtengrad.so  (product "tengrad", dynamic)  the C ABI of include/tengrad.h
//   TENGraD        (product, Swift library)      the core, for `import TENGraD`
//
// BLAS (docs/DESIGN.md §14), one trait:
//   SystemOpenBLAS (default)  the distribution's OpenBLAS + LAPACKE (Debian: libopenblas-dev
//                             liblapacke-dev)
//   ScipyOpenBLAS             PyPI's scipy-openblas32 (a current OpenBLAS, symbols prefixed
//                             scipy_); its include and lib directories come on the command line:
//                             `make build` does this by default; `make -s print-blas-flags` prints them
import PackageDescription

let package = Package(
    name: "TENGraD",
    products: [
        .library(name: "tengrad", type: .dynamic, targets: ["CTENGraD"]),
        .library(name: "TENGraD", targets: ["TENGraD"]),
        .executable(name: "tengrad-swift-example", targets: ["SwiftExample"]),
        .executable(name: "tengrad-bench", targets: ["Benchmarks"]),
    ],
    traits: [
        .trait(name: "SystemOpenBLAS", description: "Link the system's OpenBLAS and LAPACKE"),
        .trait(
            name: "ScipyOpenBLAS",
            description: "Link PyPI's scipy-openblas32 (pass -Xcc -I<its include> -Xlinker -L<its lib>)"
        ),
        .default(enabledTraits: ["SystemOpenBLAS"]),
    ],
    targets: [
        // The one seam to BLAS/LAPACK, in one of two builds (Sources/TENGraD/Linalg/BLAS.swift
        // imports the one its trait names): the system's cblas and LAPACKE ...
        .systemLibrary(
            name: "COpenBLAS",
            path: "Sources/COpenBLAS",
            providers: [.apt(["libopenblas-dev", "liblapacke-dev"])]
        ),
        // ... or scipy-openblas32's, whose prefixed symbols its shim maps to the standard names.
        .systemLibrary(name: "CScipyOpenBLAS", path: "Sources/CScipyOpenBLAS"),
        // CPU facts (vector ISA, model) for tengrad_get_blas_info: header-only, no library.
        .systemLibrary(name: "CCPU", path: "Sources/CCPU"),
        // Kernels of our own for the linear precondition (AVX2 + FMA by function attribute; the
        // core checks the CPU before calling them) and the second thread's CPU affinity.
        .target(name: "CKernels", path: "Sources/CKernels"),
        // The hand-written header, so the @_cdecl thunks use its own C types.
        .systemLibrary(name: "CTENGraDHeader", path: "include"),
        // The core: all the mathematics, a Swift-native throwing API, no C-ABI concerns.
        .target(
            name: "TENGraD",
            dependencies: [
                .target(name: "COpenBLAS", condition: .when(traits: ["SystemOpenBLAS"])),
                .target(name: "CScipyOpenBLAS", condition: .when(traits: ["ScipyOpenBLAS"])),
                "CCPU",
                "CKernels",
            ]
        ),
        // The C ABI: @_cdecl thunks, the handle box and status mapping; no math.
        .target(name: "CTENGraD", dependencies: ["TENGraD", "CTENGraDHeader"]),
        .executableTarget(name: "SwiftExample", dependencies: ["TENGraD"], path: "examples/swift"),
        .executableTarget(
            name: "Benchmarks",
            dependencies: [
                "TENGraD",
                .target(name: "COpenBLAS", condition: .when(traits: ["SystemOpenBLAS"])),
                .target(name: "CScipyOpenBLAS", condition: .when(traits: ["ScipyOpenBLAS"])),
            ],
            path: "benchmarks/swift"
        ),
        .testTarget(name: "TENGraDTests", dependencies: ["TENGraD"]),
    ]
)
