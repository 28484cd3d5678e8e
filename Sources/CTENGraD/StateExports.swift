import CTENGraDHeader
import TENGraD

// Thunks: saving and loading state.

// MARK: - State

@_cdecl("tengrad_save_state")
public func tengrad_save_state(
    _ p: OpaquePointer?, _ buffer: UnsafeMutableRawPointer?, _ capacity: Int, _ size: UnsafeMutablePointer<Int>?
) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let out = try required(size, "size")
        guard let buffer else {
            out.pointee = h.core.stateSize
            return
        }
        guard capacity >= 0 else { throw TENGraDError(.invalidArgument, "capacity overflows") }
        out.pointee = try h.core.saveState(into: UnsafeMutableRawBufferPointer(start: buffer, count: capacity))
    }
}

@_cdecl("tengrad_load_state")
public func tengrad_load_state(_ p: OpaquePointer?, _ buffer: UnsafeRawPointer?, _ size: Int) -> Int32 {
    run(p) { (h) throws(TENGraDError) in
        let b = try required(buffer, "buffer")
        guard size >= 0 else { throw TENGraDError(.invalidArgument, "size overflows") }
        try h.core.loadState(UnsafeRawBufferPointer(start: b, count: size))
    }
}
