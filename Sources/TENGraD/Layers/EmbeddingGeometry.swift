/// A lookup table `y_t = W[id_t]`, `W ∈ R^{V×D}` (PyTorch's `nn.Embedding`: weight [V][D]), applied
/// over T tokens per sample: the linear layer of one-hot inputs, whose one-hots are never formed.
/// The activations are the token ids as floats ([batch][T], integers in [0, V): exact in float32
/// up to 2²⁴, the largest vocabulary taken). The per-sample gradient is sparse: the rows of the
/// ids the sample holds,
///
///     u_i[v, :] = Σ_{t: id_it = v} g_it        (u_i = 0 on every other row)
///
/// so the products over the raw batch are gathers and scatters, O(m·T·D) each, and the Gram
/// counts the ids two samples share, weighted by their output-gradient products:
///
///     K_ij = Σ_v ⟨u_i[v, :], u_j[v, :]⟩ = Σ_{t,s: id_it = id_js} ⟨g_it, g_js⟩
///
/// computed by sorting the batch's (id, position) keys: each id's rows (summed per sample) give
/// the entries of K between the samples that hold it. The snapshot keeps the raw batch by default
/// (ids and output gradients: U has V·D numbers per sample).
struct EmbeddingGeometry: SparseRowGeometry {
    let vocabulary: Int
    let features: Int
    let tokens: Int
    let dims: BlockDims

    /// Ids travel as float32: every integer up to 2²⁴ is exact.
    static let maxVocabulary = 1 << 24

    init(vocabulary: Int, features: Int, tokens: Int = 1) throws(TENGraDError) {
        guard vocabulary > 0 else { throw .invalid("num_embeddings must be positive, got \(vocabulary)") }
        guard vocabulary <= Self.maxVocabulary else {
            throw .invalid("num_embeddings \(vocabulary) exceeds \(Self.maxVocabulary) (ids are exact float32 integers)")
        }
        guard features > 0 else { throw .invalid("embedding_dim must be positive, got \(features)") }
        guard tokens > 0 else { throw .invalid("tokens must be positive, got \(tokens)") }
        self.vocabulary = vocabulary
        self.features = features
        self.tokens = tokens
        dims = try BlockDims(
            groups: 1, patch: vocabulary, groupOut: features, positions: tokens, hasBias: false, inputSize: tokens,
            outputSize: try checkedProduct(tokens, features, what: "tokens × embedding_dim"), positionMajor: true)
    }

    static let kind = LayerKind.embedding
    var description: Preconditioner.Layer { .embedding(vocabulary: vocabulary, features: features) }
    var arrayShapes: Preconditioner.ArrayShapes {
        .init(activations: [], outputGrads: [features], weight: [vocabulary, features], bias: nil)
    }
    var takesTokens: Bool { true }
    var reportsStrategy: Bool { true }
    /// The sorted-id Gram is the factored one (pairs of positions); raw snapshots by default.
    var defaultStrategy: ConvStrategy { .factored }
    var defaultRepresentation: SnapshotRepresentation { .raw }

    func overTokens(_ tokens: Int) throws(TENGraDError) -> any BlockGeometry {
        try EmbeddingGeometry(vocabulary: vocabulary, features: features, tokens: tokens)
    }

    func checkActivations(_ a: UnsafePointer<Float>, count: Int) throws(TENGraDError) {
        let top = Float(vocabulary)
        for p in 0..<count {
            let v = a[p]
            guard v >= 0, v < top, v == v.rounded(.towardZero) else {
                throw .invalid("token id \(v) at position \(p) is not an integer in [0, \(vocabulary))")
            }
        }
    }

    /// One-hot patches: every patch entry is 0 or 1, whatever the ids.
    func patchBound(maxActivation: Float) -> Float { 1 }

    /// Never read: the sparse products (and `formRows`, `formWeightGradients`) replace every use
    /// of the patch matrix, which would be the one-hots.
    func patchScratch(samples count: Int) -> Int { 0 }
    func patches(
        _ a: UnsafePointer<Float>, start: Int, count: Int, group: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Block {
        Block(base: a + start * dims.inputSize, ld: 1, positionMajor: true)
    }

    @inline(__always) private func id(_ a: UnsafePointer<Float>, _ p: Int) -> Int { Int(a[p]) }

    // MARK: - Dense rows (per-sample snapshots, explicit Gram, per_sample_gradients)

    func formRows(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int
    ) -> Bool {
        let D = features
        for i in start..<(start + count) {
            let row = u + i * ldu
            row.update(repeating: 0, count: dims.weightCount)
            for t in 0..<tokens {
                let p = i * tokens + t
                Reduce.accumulate(g + p * D, into: row + id(a, p) * D, D)
            }
        }
        return true
    }

    /// Features `o0..<o0+n` of every row, as V × n per sample: a column block of U in another
    /// order, which the Gram (the only user of these blocks) does not see.
    func formWeightGradients(
        a: UnsafePointer<Float>, g: UnsafePointer<Float>, start: Int, count: Int, group: Int, o0: Int, n: Int,
        into u: UnsafeMutablePointer<Float>, ldu: Int, column: Int, scratch: UnsafeMutablePointer<Float>
    ) -> Bool {
        for i in start..<(start + count) {
            let block = u + i * ldu + column
            block.update(repeating: 0, count: vocabulary * n)
            for t in 0..<tokens {
                let p = i * tokens + t
                Reduce.accumulate(g + p * features + o0, into: block + id(a, p) * n, n)
            }
        }
        return true
    }

    /// The block is V × n per sample: id v's features o0..<o0+n are parameters v·D + o0 + f.
    func scaleWeightBlock(
        _ u: UnsafeMutablePointer<Float>, rows m: Int, ldu: Int, group: Int, o0: Int, n: Int, base: DiagonalBase
    ) {
        for v in 0..<vocabulary {
            base.scaleRows(u + v * n, rows: m, width: n, ldu: ldu, column: v * features + o0)
        }
    }

    // MARK: - Sparse products over the raw batch

    /// Sort keys (2 floats each), one summed row per sample of an id (m × D), their Gram (m²).
    func sparseGramScratch(samples m: Int) throws(TENGraDError) -> Int {
        let keys = try checkedProduct(2, m, tokens, what: "id keys")
        guard keys < 1 << 41 else { throw .shape("batch × tokens \(keys / 2) exceeds 2⁴⁰ (id sort keys)") }
        return try checkedSum(keys, try checkedSum(try checkedProduct(m, features, what: "id rows"), m * m, what: "workspace"),
                              what: "workspace")
    }

    func sparseGram(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, into k: UnsafeMutablePointer<Double>,
        work: UnsafeMutablePointer<Float>, base: DiagonalBase?
    ) -> Double {
        let n = m * tokens, D = features
        let rows = work + 2 * n, square = rows + m * D
        var owners = [Int](repeating: 0, count: m)
        var flops = 0.0
        // Key = id · 2⁴⁰ + position: sorted, an id's positions are consecutive, by sample.
        work.withMemoryRebound(to: UInt64.self, capacity: n) { keys in
            for p in 0..<n { keys[p] = UInt64(id(a, p)) << 40 | UInt64(p) }
            var sorted = UnsafeMutableBufferPointer(start: keys, count: n)
            sorted.sort()
            var start = 0
            while start < n {
                let v = keys[start] >> 40
                var r = 0
                var end = start
                while end < n, keys[end] >> 40 == v {
                    let p = Int(keys[end] & 0xFF_FFFF_FFFF), i = p / tokens
                    if r > 0, owners[r - 1] == i {
                        Reduce.accumulate(g + p * D, into: rows + (r - 1) * D, D)
                    } else {
                        (rows + r * D).update(from: g + p * D, count: D)
                        owners[r] = i
                        r += 1
                    }
                    end += 1
                }
                flops += Double(end - start) * Double(D)
                base?.scaleRows(rows, rows: r, width: D, ldu: D, column: Int(v) * D)
                if r <= 8 {
                    for x in 0..<r {
                        for y in 0...x {
                            let dot = Double(Reduce.dot(rows + x * D, rows + y * D, D))
                            let i = owners[x], j = owners[y]
                            k[i * m + j] += dot
                            if i != j { k[j * m + i] += dot }
                        }
                    }
                } else {
                    BLAS.syrkLower(trans: false, n: r, k: D, a: rows, lda: D, c: square, ldc: r)
                    for x in 0..<r {
                        for y in 0...x {
                            let dot = Double(square[x * r + y])
                            let i = owners[x], j = owners[y]
                            k[i * m + j] += dot
                            if i != j { k[j * m + i] += dot }
                        }
                    }
                }
                flops += Double(r) * Double(r + 1) * Double(D)
                start = end
            }
        }
        return flops
    }

    /// t_i = s Σ_t ⟨g_it, V[id_it, :]⟩: a gather.
    func sparseProject(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Double, weightGrad: UnsafePointer<Float>,
        into t: UnsafeMutablePointer<Double>
    ) -> Double {
        let D = features
        for i in 0..<m {
            var sum = 0.0
            for tk in 0..<tokens {
                let p = i * tokens + tk
                sum += Double(Reduce.dot(g + p * D, weightGrad + id(a, p) * D, D))
            }
            t[i] = s * sum
        }
        return 2 * Double(m) * Double(tokens) * Double(D)
    }

    /// weight ← β weight + Σ_i α s x_i u_i: a scaling, then a scatter-add of the scaled output
    /// gradients onto their ids' rows (in position order: the same bits every time).
    func sparseApply(
        m: Int, a: UnsafePointer<Float>, g: UnsafePointer<Float>, scale s: Double, x: UnsafePointer<Double>,
        alpha: Double, beta: Float, weight: UnsafeMutablePointer<Float>
    ) -> Double {
        let D = features, count = dims.weightCount
        if beta == 0 {
            weight.update(repeating: 0, count: count)
        } else {
            Reduce.scale(weight, by: beta, into: weight, count)  // β = 1: returns at once
        }
        for i in 0..<m {
            let w = Float(alpha * s * x[i])
            for tk in 0..<tokens {
                let p = i * tokens + tk
                let src = g + p * D, dst = weight + id(a, p) * D
                for f in 0..<D { dst[f] += w * src[f] }
            }
        }
        return Double(count) + 2 * Double(m) * Double(tokens) * Double(D)
    }

    static let stateCode: UInt32 = 4
    func writeShape(_ w: inout StateWriter) {
        w.i64(vocabulary)
        w.i64(features)
    }
    static func readShape(_ r: inout StateReader) throws(TENGraDError) -> any BlockGeometry {
        let v = try r.i64("num_embeddings"), d = try r.i64("embedding_dim")
        return try EmbeddingGeometry(vocabulary: v, features: d)
    }
}
