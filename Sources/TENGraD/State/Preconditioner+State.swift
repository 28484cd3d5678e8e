/// Saved state: everything a resumed run needs to compute bit-identical updates.
///
/// Format (version 4; versions 1 to 3 are still read), all numbers little-endian:
///
///     magic      8 bytes  "TENGRAD" 0x1A
///     u32 format version (4), u32 reserved (0), u64 payload bytes
///     payload:   f64 damping, i64 memory limit, u32 layer count,
///                per layer: u32 kind and its shape, as the kind's geometry writes it
///                  1 linear: i64 in, i64 out, u32 bias
///                  2 conv2d: i64 × 12 (channels in/out, height, width, kernel, stride, padding,
///                            dilation — each height then width), i64 groups, u32 bias
///                  3 affine: i64 features, u32 bias
///                  4 embedding: i64 vocabulary, i64 features
///                then the layer's state (see ExactBlock+State; version 2 adds the
///                representation setting and per-sample snapshots, 3 token modes, 4 bases)
///     u64 XXH64 (seed 0) of every byte before it
///
/// No pointers, no padding, no host-dependent sizes. Loading checks magic, version, length and
/// checksum first, then parses and validates every field and allocates the restored snapshots,
/// and only then changes the preconditioner; any failure leaves it exactly as it was.
///
/// Loading into a preconditioner **without layers** creates the saved layers; into one **with
/// layers**, the saved layers must match them one for one (kind and shape), else `.corrupt`.
/// Settings (damping, memory limit, conv strategies) are restored either way.
extension Preconditioner {
    static let stateMagic: [UInt8] = [0x54, 0x45, 0x4E, 0x47, 0x52, 0x41, 0x44, 0x1A]
    static let stateVersion: UInt32 = 4
    /// Oldest format version `loadState` reads.
    static let oldestStateVersion: UInt32 = 1
    private static let headerBytes = 8 + 4 + 4 + 8

    private func writeState(_ w: inout StateWriter) {
        var header = Preconditioner.stateMagic
        w.bytes(&header, header.count)
        w.u32(Preconditioner.stateVersion)
        w.u32(0)
        w.u64(0)  // payload length, patched by the caller once known
        w.f64(damping)
        w.i64(memoryLimit)
        w.u32(UInt32(layers.count))
        for layer in layers {
            LayerRecord.write(layer.geometry, &w)
            layer.writeState(&w)
        }
    }

    /// Bytes `saveState` writes.
    public var stateSize: Int {
        var counter = StateWriter()
        writeState(&counter)
        return counter.count + 8
    }

    /// Writes the state into `buffer` and returns the bytes written (`stateSize`); `.shape` if
    /// the buffer is smaller.
    public func saveState(into buffer: UnsafeMutableRawBufferPointer) throws(TENGraDError) -> Int {
        let size = stateSize
        guard let base = buffer.baseAddress, buffer.count >= size else {
            throw .shape("state needs \(size) bytes, the buffer has \(buffer.count)")
        }
        var w = StateWriter(into: base)
        writeState(&w)
        var payload = UInt64(w.count - Preconditioner.headerBytes).littleEndian
        (base + 16).copyMemory(from: &payload, byteCount: 8)
        w.u64(xxh64(UnsafeRawPointer(base), count: w.count))
        return w.count
    }

    /// The state as bytes.
    public func saveState() -> [UInt8] {
        let size = stateSize
        return [UInt8](unsafeUninitializedCapacity: size) { buffer, initialized in
            initialized = (try? saveState(into: UnsafeMutableRawBufferPointer(buffer))) ?? 0
        }
    }

    /// Restores state saved by `saveState` (see the type's documentation for the rules).
    public func loadState(_ bytes: UnsafeRawBufferPointer) throws(TENGraDError) {
        guard let base = bytes.baseAddress, bytes.count >= Preconditioner.headerBytes + 8 else {
            throw StateReader.corrupt("state of \(bytes.count) bytes is shorter than its header")
        }
        var r = StateReader(base, count: bytes.count)
        for (i, expected) in Preconditioner.stateMagic.enumerated() {
            guard base.load(fromByteOffset: i, as: UInt8.self) == expected else {
                throw StateReader.corrupt("not TENGraD state (bad magic number)")
            }
        }
        _ = try r.u64("magic")
        let version = try r.u32("version")
        guard version >= Preconditioner.oldestStateVersion, version <= Preconditioner.stateVersion else {
            throw StateReader.corrupt(
                "state format version \(version); this library reads versions \(Preconditioner.oldestStateVersion) to \(Preconditioner.stateVersion)")
        }
        guard try r.u32("reserved") == 0 else { throw StateReader.corrupt("reserved header field is not 0") }
        let payload = try r.u64("payload length")
        guard payload == UInt64(bytes.count - Preconditioner.headerBytes - 8) else {
            throw StateReader.corrupt("state declares \(payload) payload bytes but \(bytes.count - Preconditioner.headerBytes - 8) are present (truncated or trailing data)")
        }
        let stored = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: bytes.count - 8, as: UInt64.self))
        guard xxh64(base, count: bytes.count - 8) == stored else { throw StateReader.corrupt("checksum mismatch") }
        r = StateReader(base, count: bytes.count - 8)
        _ = try r.u64("magic"); _ = try r.u32("version"); _ = try r.u32("reserved"); _ = try r.u64("payload")

        let newDamping = try r.f64("damping")
        guard newDamping.isFinite, newDamping > 0 else { throw StateReader.corrupt("invalid damping \(newDamping)") }
        let newLimit = try r.i64("memory limit")
        guard newLimit >= 0 else { throw StateReader.corrupt("invalid memory limit \(newLimit)") }
        let count = Int(try r.u32("layer count"))
        let fresh = layers.isEmpty
        guard fresh || count == layers.count else {
            throw StateReader.corrupt("state has \(count) layers, this preconditioner \(layers.count)")
        }
        var targets: [ExactBlock] = []
        var restored: [ExactBlock.Restored] = []
        for id in 0..<count {
            let geometry = try LayerRecord.read(&r, layer: id)
            let description = geometry.description
            let layer: ExactBlock
            if fresh {
                layer = ExactBlock(geometry)
            } else {
                layer = layers[id]
                guard layer.geometry.description == description else {
                    throw StateReader.corrupt("layer \(id): saved shape \(description) differs from this preconditioner's \(layer.geometry.description)")
                }
            }
            do {
                restored.append(try layer.readState(&r, version: version, layer: id, budget: budget))
            } catch where error.code == .shape || error.code == .invalidArgument {
                throw StateReader.corrupt("layer \(id): \(error.message)")  // sizes no valid state has
            }
            targets.append(layer)
        }
        guard r.remaining == 0 else { throw StateReader.corrupt("\(r.remaining) unexpected bytes after the last layer") }

        // Everything parsed, validated and allocated: commit.
        damping = newDamping
        budget.limit = newLimit
        for (layer, state) in zip(targets, restored) { layer.install(state) }
        if fresh { layers = targets }
    }

    /// `loadState` from an array.
    public func loadState(_ bytes: [UInt8]) throws(TENGraDError) {
        var failure: TENGraDError?
        bytes.withUnsafeBytes { b in
            do throws(TENGraDError) { try loadState(b) } catch { failure = error }
        }
        if let failure { throw failure }
    }
}

/// A layer's kind and shape in saved state: the kind's number, then its geometry's codec.
enum LayerRecord {
    static func write(_ geometry: any BlockGeometry, _ w: inout StateWriter) {
        w.u32(type(of: geometry).stateCode)
        geometry.writeShape(&w)
    }

    static func read(_ r: inout StateReader, layer id: Int) throws(TENGraDError) -> any BlockGeometry {
        let code = try r.u32("layer \(id) kind")
        guard let kind = LayerKind.geometries.first(where: { $0.stateCode == code }) else {
            throw StateReader.corrupt("layer \(id): unknown kind \(code)")
        }
        do {
            return try kind.readShape(&r)
        } catch where error.code != .corrupt {
            throw StateReader.corrupt("layer \(id): invalid shape (\(error.message))")
        }
    }
}
