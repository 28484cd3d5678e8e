import CTENGraDHeader
import Synchronization
import TENGraD

// The C ABI of include/tengrad.h: thin @_cdecl thunks over the Swift core, one file per group of
// the header (Exports.swift: version, status, handle, settings; LayerExports, BatchExports,
// StateExports, DiagnosticsExports, BLASInfoExports), C numbers in CNumbers.swift. No math lives
// here. This file: the handle box and the helpers every thunk uses. Rules of every file here:
// nothing may trap (a trap kills the host process), so no `!`, no `try!`;
// every pointer is checked for NULL and every size comes overflow-checked from the core before a
// buffer is formed; each error becomes a status in `run` and the handle's message.

/// What a `tengrad_preconditioner *` points to: the core object and the last message.
final class Handle {
    let core = Preconditioner()
    /// Set while a call runs on this handle: a second, overlapping call (two threads sharing one
    /// handle, which the header forbids) is refused with TENGRAD_ERROR_STATE instead of
    /// corrupting the state. One uncontended compare-exchange per call.
    let busy = Atomic<Bool>(false)
    /// NUL-terminated copy of the last message, owned here; valid until the next call.
    private var message: UnsafeMutablePointer<CChar>?

    var messagePointer: UnsafePointer<CChar> {
        if let message { return UnsafePointer(message) }
        return staticText("")
    }

    func setMessage(_ text: String) {
        message?.deallocate()
        message = nil
        if text.isEmpty { return }
        var bytes = Array(text.utf8CString)
        let copy = UnsafeMutablePointer<CChar>.allocate(capacity: bytes.count)
        copy.initialize(from: &bytes, count: bytes.count)
        message = copy
    }

    deinit { message?.deallocate() }
}

@inline(__always)
func handle(_ p: OpaquePointer) -> Handle {
    Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
}

let statusOK = tengrad_status(TENGRAD_OK)
let statusInvalid = tengrad_status(TENGRAD_ERROR_INVALID_ARGUMENT)
let statusState = tengrad_status(TENGRAD_ERROR_STATE)

/// Runs `body` on the handle, mapping success and every error to a status and the handle's message.
/// A call that overlaps another on the same handle returns TENGRAD_ERROR_STATE and touches
/// nothing (not even the message, which the running call owns).
@inline(__always)
func run(_ p: OpaquePointer?, _ body: (Handle) throws(TENGraDError) -> Void) -> Int32 {
    guard let p else { return statusInvalid }
    let h = handle(p)
    guard h.busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else {
        return statusState
    }
    defer { h.busy.store(false, ordering: .releasing) }
    do {
        try body(h)
        h.setMessage("")
        return statusOK
    } catch {
        h.setMessage(error.message)
        return error.code.status
    }
}

@inline(__always)
func required<T>(_ p: T?, _ name: String) throws(TENGraDError) -> T {
    guard let p else { throw TENGraDError(.invalidArgument, "\(name) is NULL") }
    return p
}

func staticText(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}
