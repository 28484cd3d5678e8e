import CTENGraDHeader
import TENGraD

// Thunks: version, status texts, the handle's life and the handle-wide settings. The shared
// helpers (run, required, staticText) and the rules every thunk follows: Handle.swift.

// MARK: - Version and status

@_cdecl("tengrad_version_number")
public func tengrad_version_number() -> Int32 {
    Int32(TENGRAD_VERSION_MAJOR * 10000 + TENGRAD_VERSION_MINOR * 100 + TENGRAD_VERSION_PATCH)
}

@_cdecl("tengrad_status_string")
public func tengrad_status_string(_ status: Int32) -> UnsafePointer<CChar> {
    switch Int(status) {
    case Int(TENGRAD_OK): return staticText("ok")
    case Int(TENGRAD_ERROR_INVALID_ARGUMENT): return staticText("invalid argument")
    case Int(TENGRAD_ERROR_SHAPE): return staticText("shape mismatch or size overflow")
    case Int(TENGRAD_ERROR_NOT_FINITE): return staticText("input contains NaN or Inf")
    case Int(TENGRAD_ERROR_NUMERICAL): return staticText("numerical failure")
    case Int(TENGRAD_ERROR_OUT_OF_MEMORY): return staticText("out of memory")
    case Int(TENGRAD_ERROR_STATE): return staticText("call out of order")
    case Int(TENGRAD_ERROR_CORRUPT): return staticText("corrupt serialized state")
    default: return staticText("unknown status")
    }
}

// MARK: - Handle

@_cdecl("tengrad_create")
public func tengrad_create(_ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out else { return statusInvalid }
    out.pointee = OpaquePointer(Unmanaged.passRetained(Handle()).toOpaque())
    return statusOK
}

@_cdecl("tengrad_destroy")
public func tengrad_destroy(_ p: OpaquePointer?) {
    guard let p else { return }
    Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(p)).release()
}

@_cdecl("tengrad_last_error")
public func tengrad_last_error(_ p: OpaquePointer?) -> UnsafePointer<CChar> {
    guard let p else { return staticText("NULL tengrad_preconditioner handle") }
    let h = handle(p)
    // While a call runs on the handle its message may be replaced (and the old text freed) at any
    // moment: do not read it (the caller is most likely the thread whose call was refused).
    if h.busy.load(ordering: .acquiring) { return staticText("handle busy (concurrent call)") }
    return h.messagePointer
}

// MARK: - Settings

@_cdecl("tengrad_set_damping")
public func tengrad_set_damping(_ p: OpaquePointer?, _ damping: Double) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try h.core.setDamping(damping) }
}

@_cdecl("tengrad_get_damping")
public func tengrad_get_damping(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Double>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = h.core.damping }
}

@_cdecl("tengrad_set_memory_limit")
public func tengrad_set_memory_limit(_ p: OpaquePointer?, _ bytes: Int64) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try h.core.setMemoryLimit(Int(bytes)) }
}

@_cdecl("tengrad_get_memory_limit")
public func tengrad_get_memory_limit(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = Int64(h.core.memoryLimit) }
}

@_cdecl("tengrad_get_memory_usage")
public func tengrad_get_memory_usage(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Int64>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = Int64(h.core.memoryInUse) }
}

@_cdecl("tengrad_set_blas_threads")
public func tengrad_set_blas_threads(_ p: OpaquePointer?, _ threads: Int32) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try h.core.setBLASThreads(Int(threads)) }
}

@_cdecl("tengrad_get_blas_threads")
public func tengrad_get_blas_threads(_ p: OpaquePointer?, _ out: UnsafeMutablePointer<Int32>?) -> Int32 {
    run(p) { (h) throws(TENGraDError) in try required(out, "out").pointee = Int32(h.core.blasThreads) }
}
