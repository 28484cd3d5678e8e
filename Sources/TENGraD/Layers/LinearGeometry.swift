/// A fully connected layer `y = W a (+ b)`, `W ∈ R^{out×in}`, as patches × positions
/// (docs/DESIGN.md §3): one position per sample, the patch is the sample's input row itself, a
/// view of the caller's activations — nothing is copied or unfolded. Applied over T tokens
/// (inputs [batch][T][in]) the positions are the tokens and the patch matrix is Aᵢᵀ, still a view.
///
/// With L = 1 the factored Gram is the Hadamard product of two small Grams,
/// `K = s² (ÃÃᵀ) ∘ (GGᵀ)`, and the raw-batch products are the GEMMs `T = A Vᵀ` and
/// `W = Gᵀ diag(x) A`: U (out·(in+1) numbers per sample) is never formed.
struct LinearGeometry: BlockGeometry {
    let inFeatures: Int
    let outFeatures: Int
    let hasBias: Bool
    /// Positions per sample (tokens); 1 for an ordinary linear layer.
    let tokens: Int
    let dims: BlockDims

    init(inFeatures: Int, outFeatures: Int, hasBias: Bool, tokens: Int = 1) throws(TENGraDError) {
        guard inFeatures > 0 else { throw .invalid("in_features must be positive, got \(inFeatures)") }
        guard outFeatures > 0 else { throw .invalid("out_features must be positive, got \(outFeatures)") }
        guard tokens > 0 else { throw .invalid("tokens must be positive, got \(tokens)") }
        self.inFeatures = inFeatures
        self.outFeatures = outFeatures
        self.hasBias = hasBias
        self.tokens = tokens
        dims = try BlockDims(
            groups: 1, patch: inFeatures, groupOut: outFeatures, positions: tokens, hasBias: hasBias,
            inputSize: try checkedProduct(tokens, inFeatures, what: "tokens × in_features"),
            outputSize: try checkedProduct(tokens, outFeatures, what: "tokens × out_features"),
            positionMajor: true)
    }

    static let kind = LayerKind.linear
    var takesTokens: Bool { true }
    var description: Preconditioner.Layer { .linear(inFeatures: inFeatures, outFeatures: outFeatures, bias: hasBias) }
    var arrayShapes: Preconditioner.ArrayShapes {
        .init(activations: [inFeatures], outputGrads: [outFeatures], weight: [outFeatures, inFeatures],
              bias: hasBias ? [outFeatures] : nil)
    }

    func overTokens(_ tokens: Int) throws(TENGraDError) -> any BlockGeometry {
        try LinearGeometry(inFeatures: inFeatures, outFeatures: outFeatures, hasBias: hasBias, tokens: tokens)
    }

    func patchScratch(samples count: Int) -> Int { 0 }

    func patches(
        _ a: UnsafePointer<Float>, start: Int, count: Int, group: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Block {
        Block(base: a + start * dims.inputSize, ld: inFeatures, positionMajor: true)
    }

    static let stateCode: UInt32 = 1
    func writeShape(_ w: inout StateWriter) {
        w.i64(inFeatures)
        w.i64(outFeatures)
        w.bool(hasBias)
    }
    static func readShape(_ r: inout StateReader) throws(TENGraDError) -> any BlockGeometry {
        let i = try r.i64("in_features"), o = try r.i64("out_features"), b = try r.bool("bias flag")
        return try LinearGeometry(inFeatures: i, outFeatures: o, hasBias: b)
    }
}
