/* The library's helper thread for two-thread jobs (docs/DESIGN.md §8): one per process, started
   on first use, parked between jobs, never holding a job of its own. */
#ifndef TENGRAD_HELPER_H
#define TENGRAD_HELPER_H

/* Internal to libtengrad.so: none of these is exported (tengrad.h is the whole ABI). */
#define TENGRAD_H_INTERNAL __attribute__((visibility("hidden")))

/* Hands run(context) to the helper thread, pinned away from the caller's CPU, and returns at
   once: 0 when the helper took it (the caller must then call tengrad_k_helper_join), nonzero when
   it did not — another caller holds the helper, this thread may run on one CPU only, no thread
   could be started, or not Linux — and the caller runs the job some other way. */
TENGRAD_H_INTERNAL int tengrad_k_helper_start(void (*run)(void *), void *context);

/* Waits until the job handed over by this thread's tengrad_k_helper_start has returned, and
   frees the helper for the next caller. */
TENGRAD_H_INTERNAL void tengrad_k_helper_join(void);

/* Sets attr's CPU affinity to the CPUs this thread may run on except the one it runs on now.
   Returns 0 when set, nonzero when left unset. For threads started per job, when the helper is
   held by another caller. */
TENGRAD_H_INTERNAL int tengrad_k_other_cpus(void *pthread_attr);

#endif
