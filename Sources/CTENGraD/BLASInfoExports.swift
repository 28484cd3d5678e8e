import CTENGraDHeader
import TENGraD

// tengrad_get_blas_info: the core's BLASInfo in the header's struct. Process-wide, no handle.

@_cdecl("tengrad_get_blas_info")
public func tengrad_get_blas_info(_ info: UnsafeMutablePointer<tengrad_blas_info>?) -> Int32 {
    let b = BLASInfo.current
    var c = tengrad_blas_info()
    c.size = MemoryLayout<tengrad_blas_info>.size
    copy(b.library, into: &c.library)
    copy(b.build, into: &c.build)
    copy(b.version, into: &c.version)
    copy(b.core, into: &c.core)
    copy(b.config, into: &c.config)
    c.threads = Int32(clamping: b.threads)
    c.core_isa = Int32(b.coreISA.rawValue)
    c.cpu_isa = Int32(b.cpuISA.rawValue)
    c.generic_fallback = b.isGenericFallback ? 1 : 0
    copy(b.cpuModel, into: &c.cpu_model)
    c.cpu_family = Int32(clamping: b.cpuFamily)
    c.cpu_model_number = Int32(clamping: b.cpuModelNumber)
    // No handle holds a message: the size rule's refusal is the status alone.
    return (try? writeCallerStruct(c, to: info, "info", type: "tengrad_blas_info")) != nil ? statusOK : statusInvalid
}

/// Copies `text` into a fixed C char array (imported as a tuple), truncated to leave a NUL.
private func copy<T>(_ text: String, into field: inout T) {
    withUnsafeMutableBytes(of: &field) { raw in
        raw.initializeMemory(as: UInt8.self, repeating: 0)
        let n = min(text.utf8.count, raw.count - 1)
        for (i, byte) in text.utf8.prefix(n).enumerated() { raw[i] = byte }
    }
}
