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
/// done; runs both on the calling thread if no thread can be had. For work no BLAS call covers (the
/// fused linear products, per-sample gradients, passes over a large gradient): used only where the
/// handle's BLAS thread count (the cores the caller gave us) is at least 2.
///
/// The second thread is the library's helper (Sources/CKernels/helper.c): one per process,
/// started on first use and parked between jobs, because starting and joining a thread per job
/// cost 40–56 µs on a 2-vCPU VM against 9–17 µs to wake a parked one — a tenth of a 1024²
/// precondition, done twice. When another caller holds the helper (two handles used from two
/// threads at once, or a job inside a job) a thread is started for this job alone. Either thread
/// runs on any CPU the process may use but the caller's current one: left to itself the
/// scheduler wakes it beside the caller when another core looks busy, and on two cores
/// OpenBLAS's worker, spinning after its last call, keeps the other core looking busy (a
/// two-thread job then ran at one thread's speed; pinned away, a short job runs at two, Linux
/// running the woken thread first, while a long one shares that core with the worker until its
/// spin times out: it spins on `nop`s, never yielding). docs/DESIGN.md §8.
func onTwoThreads(_ body: (Int) -> Void) {
    final class Job {
        let body: (Int) -> Void
        init(_ body: @escaping (Int) -> Void) { self.body = body }
    }
    withoutActuallyEscaping(body) { escaping in
        let job = Unmanaged.passRetained(Job(escaping))
        if tengrad_k_helper_start({ raw in Unmanaged<Job>.fromOpaque(raw!).takeRetainedValue().body(0) }, job.toOpaque()) == 0 {
            escaping(1)
            tengrad_k_helper_join()
            return
        }
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
