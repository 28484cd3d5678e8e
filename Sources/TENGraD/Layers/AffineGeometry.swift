/// A per-feature scale and shift `y = γ ∘ x̂ (+ β)`, γ, β ∈ R^D: the affine part of LayerNorm,
/// RMSNorm (no β) and other normalizations, whose inputs x̂ (the normalized activations) the
/// caller hands in. Applied over T tokens (inputs [batch][T][D]) like a linear layer. The per-
/// sample gradient is
///
///     u_i = [Σ_t g_it ∘ x̂_it , Σ_t g_it]        (2D numbers, or D without β)
///
/// As patches × positions it is D groups of one feature in and one out (a depthwise layer): the
/// kernel's mathematics holds unchanged, but its per-group products would be D tiny GEMMs, so
/// this kind forms its rows itself (one pass over the batch) and its snapshots keep U, which is
/// never larger than the batch: the explicit Gram and the per-sample representation by default.
struct AffineGeometry: BlockGeometry {
    let features: Int
    let hasBias: Bool
    let tokens: Int
    let dims: BlockDims

    init(features: Int, hasBias: Bool, tokens: Int = 1) throws(TENGraDError) {
        guard features > 0 else { throw .invalid("features must be positive, got \(features)") }
        guard tokens > 0 else { throw .invalid("tokens must be positive, got \(tokens)") }
        self.features = features
        self.hasBias = hasBias
        self.tokens = tokens
        let size = try checkedProduct(tokens, features, what: "tokens × features")
        dims = try BlockDims(
            groups: features, patch: 1, groupOut: 1, positions: tokens, hasBias: hasBias, inputSize: size,
            outputSize: size, positionMajor: true)
    }

    static let kind = LayerKind.affine
    var description: Preconditioner.Layer { .affine(features: features, bias: hasBias) }
    var arrayShapes: Preconditioner.ArrayShapes {
        .init(activations: [features], outputGrads: [features], weight: [features], bias: hasBias ? [features] : nil)
    }
    var takesTokens: Bool { true }
    var reportsStrategy: Bool { true }
    var defaultStrategy: ConvStrategy { .explicit }
    var defaultRepresentation: SnapshotRepresentation { .perSample }

    func overTokens(_ tokens: Int) throws(TENGraDError) -> any BlockGeometry {
        try AffineGeometry(features: features, hasBias: hasBias, tokens: tokens)
    }

    func patchScratch(samples count: Int) -> Int { 0 }

    func patches(
        _ a: UnsafePointer<Float>, start: Int, count: Int, group: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Block {
        Block(base: a + start * dims.inputSize + group, ld: features, positionMajor: true)
    }

    func formRows(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int
    ) -> Bool {
        let D = features
        for i in start..<(start + count) {
            let w = u + i * ldu, b = w + D
            let x0 = a + i * dims.inputSize, g0 = g + i * dims.outputSize
            w.update(repeating: 0, count: D)
            if hasBias { b.update(repeating: 0, count: D) }
            for t in 0..<tokens {
                let x = x0 + t * D, gt = g0 + t * D
                for f in 0..<D { w[f] += gt[f] * x[f] }
                if hasBias { for f in 0..<D { b[f] += gt[f] } }
            }
        }
        return true
    }

    static let stateCode: UInt32 = 3
    func writeShape(_ w: inout StateWriter) {
        w.i64(features)
        w.bool(hasBias)
    }
    static func readShape(_ r: inout StateReader) throws(TENGraDError) -> any BlockGeometry {
        let features = try r.i64("features"), bias = try r.bool("bias flag")
        return try AffineGeometry(features: features, hasBias: bias)
    }
}
