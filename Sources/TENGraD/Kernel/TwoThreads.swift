#if canImport(Glibc)
import Glibc
#endif
import CKernels

/// Arrays from this many elements (16 MiB of floats) are passed over in two halves on two threads
/// when BLAS may use two (`inHalves`): below it a thread's start costs more than it saves.
let twoThreadArrayCount = 1 << 22

/// `body(part, range)` over 0..<n: in two halves on two threads (parts 0 and 1) from
/// `twoThreadArrayCount` elements when BLAS may use two threads, else once on the calling thread
/// (part 0, the whole range). For the passes over a large gradient (docs/DESIGN.md §8).
func inHalves(_ n: Int, _ body: (Int, Range<Int>) -> Void) {
    guard n >= twoThreadArrayCount && BLAS.threads >= 2 else { return body(0, 0..<n) }
    let half = n / 2
    onTwoThreads { part in body(part, part == 0 ? 0..<half : half..<n) }
}

/// Runs `body(0)` on a second thread and `body(1)` on the calling one, and returns when both are
/// done; runs both on the calling thread if no thread can be started. For passes over large
/// arrays that no BLAS call covers (the gradient's validation before a precondition reads 4 bytes
/// per parameter at one core's memory bandwidth, as much time as a GEMM of m = 16): the library
/// has no threads of its own otherwise, and uses this only where the handle's BLAS thread count
/// (the cores the caller gave us) is at least 2. The second thread may run on any CPU the
/// process may use but the caller's current one: left to itself the scheduler starts it beside
/// the caller when another core looks busy, and on two cores OpenBLAS's worker, spinning after
/// its last call, keeps the other core looking busy (a two-thread job then ran at one thread's
/// speed; pinned away it runs at two, the spinning worker yielding to it).
func onTwoThreads(_ body: (Int) -> Void) {
    final class Job {
        let body: (Int) -> Void
        init(_ body: @escaping (Int) -> Void) { self.body = body }
    }
    withoutActuallyEscaping(body) { escaping in
        let job = Unmanaged.passRetained(Job(escaping))
        var thread = pthread_t()
        var attributes = pthread_attr_t()
        pthread_attr_init(&attributes)
        defer { pthread_attr_destroy(&attributes) }
        _ = tengrad_k_other_cpus(&attributes)
        let started = pthread_create(&thread, &attributes, { raw in
            let job = Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue()
            job.body(0)
            return nil
        }, job.toOpaque())
        guard started == 0 else {
            job.release()
            escaping(0)
            escaping(1)
            return
        }
        escaping(1)
        pthread_join(thread, nil)
    }
}
