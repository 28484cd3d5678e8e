/// Little-endian encoding for saved state, and its checksum.
///
/// One `StateWriter` routine serves both halves of "size query then fill": with no buffer it only
/// counts bytes. `StateReader` checks every read against the bytes that remain, so a damaged or
/// hostile blob can never read out of bounds or make the loader allocate more than it holds.

struct StateWriter {
    private let base: UnsafeMutableRawPointer?
    private(set) var count = 0

    /// A writer that only counts.
    init() { base = nil }
    /// A writer into a buffer the caller sized with a counting pass.
    init(into base: UnsafeMutableRawPointer) { self.base = base }

    mutating func bytes(_ p: UnsafeRawPointer, _ n: Int) {
        base?.advanced(by: count).copyMemory(from: p, byteCount: n)
        count += n
    }
    mutating func u32(_ v: UInt32) { var x = v.littleEndian; bytes(&x, 4) }
    mutating func u64(_ v: UInt64) { var x = v.littleEndian; bytes(&x, 8) }
    mutating func i64(_ v: Int) { u64(UInt64(bitPattern: Int64(v))) }
    mutating func f32(_ v: Float) { u32(v.bitPattern) }
    mutating func f64(_ v: Double) { u64(v.bitPattern) }
    mutating func bool(_ v: Bool) { u32(v ? 1 : 0) }

    /// Arrays of numbers, little-endian (x86-64 and arm64 already are: a straight copy there).
    mutating func floats(_ p: UnsafePointer<Float>, _ n: Int) {
        #if _endian(little)
        bytes(p, n * 4)
        #else
        for i in 0..<n { f32(p[i]) }
        #endif
    }
    mutating func doubles(_ p: UnsafePointer<Double>, _ n: Int) {
        #if _endian(little)
        bytes(p, n * 8)
        #else
        for i in 0..<n { f64(p[i]) }
        #endif
    }
}

struct StateReader {
    private let base: UnsafeRawPointer
    let count: Int
    private(set) var offset = 0

    init(_ base: UnsafeRawPointer, count: Int) {
        self.base = base
        self.count = count
    }

    var remaining: Int { count - offset }

    static func corrupt(_ message: String) -> TENGraDError { TENGraDError(.corrupt, message) }

    private mutating func take(_ n: Int, _ what: @autoclosure () -> String) throws(TENGraDError) -> UnsafeRawPointer {
        guard n >= 0, n <= remaining else {
            throw Self.corrupt("state truncated: \(what()) needs \(n) bytes at offset \(offset), \(remaining) remain")
        }
        defer { offset += n }
        return base + offset
    }

    mutating func u32(_ what: @autoclosure () -> String) throws(TENGraDError) -> UInt32 {
        UInt32(littleEndian: try take(4, what()).loadUnaligned(as: UInt32.self))
    }
    mutating func u64(_ what: @autoclosure () -> String) throws(TENGraDError) -> UInt64 {
        UInt64(littleEndian: try take(8, what()).loadUnaligned(as: UInt64.self))
    }
    mutating func i64(_ what: @autoclosure () -> String) throws(TENGraDError) -> Int {
        Int(Int64(bitPattern: try u64(what())))
    }
    mutating func f32(_ what: @autoclosure () -> String) throws(TENGraDError) -> Float {
        Float(bitPattern: try u32(what()))
    }
    mutating func f64(_ what: @autoclosure () -> String) throws(TENGraDError) -> Double {
        Double(bitPattern: try u64(what()))
    }
    mutating func bool(_ what: @autoclosure () -> String) throws(TENGraDError) -> Bool {
        switch try u32(what()) {
        case 0: return false
        case 1: return true
        case let v: throw Self.corrupt("\(what()) must be 0 or 1, got \(v)")
        }
    }

    /// Checks that `n` elements of `size` bytes remain (before anything is allocated for them).
    func require(_ n: Int, size: Int, _ what: @autoclosure () -> String) throws(TENGraDError) {
        let (bytes, overflow) = n.multipliedReportingOverflow(by: size)
        guard n >= 0, !overflow, bytes <= remaining else {
            throw Self.corrupt("state truncated: \(what()) needs \(n) × \(size) bytes, \(remaining) remain")
        }
    }

    mutating func floats(into p: UnsafeMutablePointer<Float>, _ n: Int, _ what: @autoclosure () -> String) throws(TENGraDError) {
        let src = try take(n * 4, what())
        #if _endian(little)
        UnsafeMutableRawPointer(p).copyMemory(from: src, byteCount: n * 4)
        #else
        for i in 0..<n { p[i] = Float(bitPattern: UInt32(littleEndian: src.loadUnaligned(fromByteOffset: 4 * i, as: UInt32.self))) }
        #endif
    }
    mutating func doubles(into p: UnsafeMutablePointer<Double>, _ n: Int, _ what: @autoclosure () -> String) throws(TENGraDError) {
        let src = try take(n * 8, what())
        #if _endian(little)
        UnsafeMutableRawPointer(p).copyMemory(from: src, byteCount: n * 8)
        #else
        for i in 0..<n { p[i] = Double(bitPattern: UInt64(littleEndian: src.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self))) }
        #endif
    }
}

/// XXH64 (seed 0) of a byte range: the state blob's checksum. Fast (8 bytes per step in four
/// lanes) so checksumming a large snapshot costs about as much as copying it.
func xxh64(_ p: UnsafeRawPointer, count: Int) -> UInt64 {
    let p1: UInt64 = 0x9E37_79B1_85EB_CA87, p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F, p3: UInt64 = 0x1656_67B1_9E37_79F9
    let p4: UInt64 = 0x85EB_CA77_C2B2_AE63, p5: UInt64 = 0x27D4_EB2F_1656_67C5
    @inline(__always) func rotl(_ x: UInt64, _ r: UInt64) -> UInt64 { (x << r) | (x >> (64 - r)) }
    @inline(__always) func round(_ acc: UInt64, _ input: UInt64) -> UInt64 { rotl(acc &+ input &* p2, 31) &* p1 }
    @inline(__always) func merge(_ acc: UInt64, _ v: UInt64) -> UInt64 { (acc ^ round(0, v)) &* p1 &+ p4 }
    @inline(__always) func read64(_ at: Int) -> UInt64 { UInt64(littleEndian: p.loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
    var offset = 0
    var h: UInt64
    if count >= 32 {
        var v1 = p1 &+ p2, v2 = p2, v3: UInt64 = 0, v4 = 0 &- p1
        while offset + 32 <= count {
            v1 = round(v1, read64(offset))
            v2 = round(v2, read64(offset + 8))
            v3 = round(v3, read64(offset + 16))
            v4 = round(v4, read64(offset + 24))
            offset += 32
        }
        h = rotl(v1, 1) &+ rotl(v2, 7) &+ rotl(v3, 12) &+ rotl(v4, 18)
        h = merge(h, v1)
        h = merge(h, v2)
        h = merge(h, v3)
        h = merge(h, v4)
    } else {
        h = p5
    }
    h = h &+ UInt64(count)
    while offset + 8 <= count {
        h ^= round(0, read64(offset))
        h = rotl(h, 27) &* p1 &+ p4
        offset += 8
    }
    if offset + 4 <= count {
        h ^= UInt64(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: offset, as: UInt32.self))) &* p1
        h = rotl(h, 23) &* p2 &+ p3
        offset += 4
    }
    while offset < count {
        h ^= UInt64(p.load(fromByteOffset: offset, as: UInt8.self)) &* p5
        h = rotl(h, 11) &* p1
        offset += 1
    }
    h ^= h >> 33
    h = h &* p2
    h ^= h >> 29
    h = h &* p3
    h ^= h >> 32
    return h
}
