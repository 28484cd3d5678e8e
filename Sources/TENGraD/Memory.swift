#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// Counts the bytes a preconditioner holds and enforces its optional cap.
final class MemoryBudget {
    /// Cap in bytes; 0 means none.
    var limit: Int = 0
    private(set) var inUse: Int = 0

    func reserve(_ bytes: Int, for what: @autoclosure () -> String) throws(TENGraDError) {
        let (total, overflow) = inUse.addingReportingOverflow(bytes)
        if overflow || (limit > 0 && total > limit) {
            throw TENGraDError(
                .outOfMemory,
                "\(what()) needs \(bytes) bytes; \(inUse) in use, memory limit \(limit) bytes")
        }
        inUse = total
    }

    func release(_ bytes: Int) { inUse -= bytes }
}

/// A fixed-size array of trivial numbers on the C heap, counted against a budget. Allocation
/// failure is a thrown `.outOfMemory`, never a trap (Swift's own arrays trap when malloc fails).
final class Storage<Element: BitwiseCopyable> {
    let base: UnsafeMutablePointer<Element>
    let count: Int
    let bytes: Int
    private let budget: MemoryBudget

    init(count: Int, budget: MemoryBudget, what: @autoclosure () -> String) throws(TENGraDError) {
        let bytes = try checkedProduct(max(count, 1), MemoryLayout<Element>.stride, what: what())
        try budget.reserve(bytes, for: what())
        guard let raw = Storage.allocate(bytes) else {
            budget.release(bytes)
            throw TENGraDError(.outOfMemory, "\(what()): malloc of \(bytes) bytes failed")
        }
        self.base = raw.bindMemory(to: Element.self, capacity: max(count, 1))
        self.count = count
        self.bytes = bytes
        self.budget = budget
    }

    deinit {
        free(base)
        budget.release(bytes)
    }

    var buffer: UnsafeMutableBufferPointer<Element> { UnsafeMutableBufferPointer(start: base, count: count) }

    /// Blocks this large (a per-sample snapshot's U is tens to hundreds of MiB, allocated anew at
    /// every refresh) are 2 MiB-aligned and, on Linux, advised to use transparent huge pages:
    /// first touch then faults once per 2 MiB instead of once per 4 KiB page (measured: the faults
    /// of a new 302 MB U took ~15 % of a 256→256 convolution's refresh). Freed with `free` as
    /// every other block.
    static var hugePageThreshold: Int { 16 << 20 }

    private static func allocate(_ bytes: Int) -> UnsafeMutableRawPointer? {
        guard bytes >= hugePageThreshold else { return malloc(bytes) }
        let huge = 2 << 20
        var raw: UnsafeMutableRawPointer?
        let rounded = (bytes + huge - 1) / huge * huge
        guard posix_memalign(&raw, huge, rounded) == 0, let raw else { return nil }
        #if os(Linux)
        _ = madvise(raw, rounded, 14)  // MADV_HUGEPAGE; advice only: failure changes nothing
        #endif
        return raw
    }
}

/// Scratch space shared by all layers of one preconditioner (a handle is used by one thread at a
/// time). It grows to the largest request and is kept, so steady-state steps allocate nothing.
final class Workspace {
    private var floats: Storage<Float>?
    private var doubles: Storage<Double>?
    private let budget: MemoryBudget

    init(budget: MemoryBudget) { self.budget = budget }

    var bytes: Int { floatBytes + (doubles?.bytes ?? 0) }
    var floatBytes: Int { floats?.bytes ?? 0 }

    func floats(_ count: Int) throws(TENGraDError) -> UnsafeMutablePointer<Float> {
        if let f = floats, f.count >= count { return f.base }
        floats = nil  // release first, so the memory limit counts only the new size
        let grown = try Storage<Float>(count: count, budget: budget, what: "workspace")
        floats = grown
        return grown.base
    }

    func doubles(_ count: Int) throws(TENGraDError) -> UnsafeMutablePointer<Double> {
        if let d = doubles, d.count >= count { return d.base }
        doubles = nil
        let grown = try Storage<Double>(count: count, budget: budget, what: "workspace")
        doubles = grown
        return grown.base
    }

    /// The sizes before a call, to undo its growth if it fails.
    struct Mark {
        fileprivate let floats: Int?
        fileprivate let doubles: Int?
    }

    var mark: Mark { Mark(floats: floats?.count, doubles: doubles?.count) }

    /// Back to the sizes of `mark` (a failed call must not change the memory in use). The
    /// contents are scratch and are not restored. Re-allocating a size that fitted before cannot
    /// exceed the budget; should malloc fail anyway, the workspace is left empty (smaller).
    func restore(_ m: Mark) {
        if floats?.count != m.floats {
            floats = nil
            if let n = m.floats { floats = try? Storage<Float>(count: n, budget: budget, what: "workspace") }
        }
        if doubles?.count != m.doubles {
            doubles = nil
            if let n = m.doubles { doubles = try? Storage<Double>(count: n, budget: budget, what: "workspace") }
        }
    }
}

/// Monotonic wall-clock seconds, for diagnostics.
func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}
