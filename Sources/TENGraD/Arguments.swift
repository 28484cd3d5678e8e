/// Checks of a call's arguments against its layer, shared by the entry points: sizes, NULL,
/// presence of the bias, grad scale, and overlap of outputs with each other and with inputs. Each
/// throws the error the C ABI reports.
enum Arguments {
    /// Whether n floats at p and k floats at q share memory.
    private static func overlaps(_ p: UnsafeRawPointer, _ n: Int, _ q: UnsafeRawPointer, _ k: Int) -> Bool {
        p < q + 4 * k && q < p + 4 * n
    }

    /// `natural_gradient` writes its updates while it still reads the batch (and keeps a copy of it
    /// in the snapshot), so an update buffer must not overlap the activations or output gradients.
    static func checkNoOverlap(
        outputs weight: (UnsafeMutablePointer<Float>, Int), _ bias: (UnsafeMutablePointer<Float>?, Int),
        inputs: [(UnsafePointer<Float>, Int, String)]
    ) throws(TENGraDError) {
        for (input, count, name) in inputs {
            if overlaps(weight.0, weight.1, input, count) {
                throw .invalid("weight_update overlaps \(name): natural_gradient's outputs must not alias its inputs")
            }
            if let b = bias.0, overlaps(b, bias.1, input, count) {
                throw .invalid("bias_update overlaps \(name): natural_gradient's outputs must not alias its inputs")
            }
        }
    }

    /// `precondition` may write its updates over its gradients (the same arrays: in place) but not
    /// over part of them, over the other gradient, or the bias update over the weight update.
    /// A precondition's gradients and update buffers, checked against the layer: sizes, the
    /// bias present exactly when the layer has one, outputs in place or disjoint from the inputs.
    static func update(
        _ l: ExactBlock, _ weightGrad: UnsafeBufferPointer<Float>, _ biasGrad: UnsafeBufferPointer<Float>?,
        _ weightUpdate: UnsafeMutableBufferPointer<Float>, _ biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) -> (UnsafePointer<Float>, UnsafePointer<Float>?, UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>?) {
        let w = try base(weightGrad, count: l.dims.weightCount, "weight_grad")
        let b = try bias(biasGrad, count: l.dims.biasCount, "bias_grad")
        let (wu, bu) = try updateOutputs(l, weightUpdate, biasUpdate)
        try checkInPlaceOrDisjoint(outputs: (wu, l.dims.weightCount), (bu, l.dims.biasCount), inputs: w, b)
        return (w, b, wu, bu)
    }

    static func checkInPlaceOrDisjoint(
        outputs weight: (UnsafeMutablePointer<Float>, Int), _ bias: (UnsafeMutablePointer<Float>?, Int),
        inputs weightGrad: UnsafePointer<Float>, _ biasGrad: UnsafePointer<Float>?
    ) throws(TENGraDError) {
        let (wu, wn) = weight
        if UnsafePointer(wu) != weightGrad, overlaps(wu, wn, weightGrad, wn) {
            throw .invalid("weight_update overlaps weight_grad without being it: in place takes the same array")
        }
        guard let bu = bias.0, let biasGrad else { return }
        let bn = bias.1
        if UnsafePointer(bu) != biasGrad, overlaps(bu, bn, biasGrad, bn) {
            throw .invalid("bias_update overlaps bias_grad without being it: in place takes the same array")
        }
        if overlaps(wu, wn, biasGrad, bn) { throw .invalid("weight_update overlaps bias_grad") }
        if overlaps(bu, bn, weightGrad, wn) { throw .invalid("bias_update overlaps weight_grad") }
    }

    static func checkScale(_ s: Float) throws(TENGraDError) {
        guard s.isFinite, s > 0 else { throw .invalid("grad_scale must be finite and > 0, got \(s)") }
    }

    static func base<T>(_ buffer: UnsafeBufferPointer<T>, count: Int, _ name: String) throws(TENGraDError) -> UnsafePointer<T> {
        guard buffer.count == count else { throw .shape("\(name) has \(buffer.count) elements, the layer needs \(count)") }
        guard let p = buffer.baseAddress else { throw .invalid("\(name) is NULL") }
        return p
    }

    static func bias<T>(_ buffer: UnsafeBufferPointer<T>?, count: Int, _ name: String) throws(TENGraDError) -> UnsafePointer<T>? {
        guard let buffer else {
            if count > 0 { throw .invalid("\(name) is missing but the layer has a bias") }
            return nil
        }
        guard count > 0 else { throw .invalid("\(name) is given but the layer has no bias") }
        return try base(buffer, count: count, name)
    }

    /// The checked update arrays of a call, as mutable pointers.
    static func updateOutputs(
        _ l: ExactBlock, _ weightUpdate: UnsafeMutableBufferPointer<Float>,
        _ biasUpdate: UnsafeMutableBufferPointer<Float>?
    ) throws(TENGraDError) -> (UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>?) {
        let wu = try base(UnsafeBufferPointer(weightUpdate), count: l.dims.weightCount, "weight_update")
        let bu = try bias(biasUpdate.map { UnsafeBufferPointer($0) }, count: l.dims.biasCount, "bias_update")
        if let bu, overlaps(bu, l.dims.biasCount, wu, l.dims.weightCount) {
            throw .invalid("bias_update overlaps weight_update: each update needs its own memory")
        }
        return (UnsafeMutablePointer(mutating: wu), bu.map { UnsafeMutablePointer(mutating: $0) })
    }
}
