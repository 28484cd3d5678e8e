/// The one error type of the Swift API. `code` maps one-to-one onto the C ABI's `tengrad_status`
/// (the mapping lives in the C-facing layer, Sources/CTENGraD).
public struct TENGraDError: Error, Equatable, CustomStringConvertible {
    public enum Code: Sendable, Equatable {
        /// NULL pointer, non-positive size, unknown layer id, bad value.
        case invalidArgument
        /// Sizes inconsistent with the layer, or size overflow.
        case shape
        /// NaN or Inf in an input; nothing was changed.
        case notFinite
        /// Factorization failed even with jitter, or an intermediate result overflowed.
        case numerical
        /// Allocation failed or the memory limit would be exceeded.
        case outOfMemory
        /// Call out of order, e.g. precondition before any curvature.
        case state
        /// Serialized state is damaged or of another format.
        case corrupt
    }

    public var code: Code
    public var message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "\(code): \(message)" }

    static func invalid(_ message: String) -> TENGraDError { TENGraDError(.invalidArgument, message) }
    static func shape(_ message: String) -> TENGraDError { TENGraDError(.shape, message) }
}

/// Overflow-checked size arithmetic: every size that reaches an allocation or a pointer offset
/// goes through these, so that hostile sizes are a `.shape` error, never a trap.
@inline(__always)
func checkedProduct(_ factors: Int..., what: @autoclosure () -> String) throws(TENGraDError) -> Int {
    var product = 1
    for factor in factors {
        let (p, overflow) = product.multipliedReportingOverflow(by: factor)
        if overflow { throw .shape("\(what()) overflows a 64-bit size") }
        product = p
    }
    return product
}

@inline(__always)
func checkedSum(_ a: Int, _ b: Int, what: @autoclosure () -> String) throws(TENGraDError) -> Int {
    let (s, overflow) = a.addingReportingOverflow(b)
    if overflow { throw .shape("\(what()) overflows a 64-bit size") }
    return s
}
