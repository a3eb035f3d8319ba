//! The CPU backend's threads: rayon's global pool, which every op's parallel loop runs on.
//!
//! A loop started by a thread outside the pool is handed to the pool's threads, and its caller
//! is parked until they finish: two thread switches for every op, 3–5 % of the fp32 embedding
//! and training step on the Zen 4 VM (session 30). Two ways to start the loops in place:
//! [`join_global_pool`] makes the calling thread one of the pool's threads for good (what the
//! `semshare` binary, the benches and the examples do first), and `Backend::run_pooled` runs
//! one piece of work (an embedding) on a thread of the pool.

/// Makes the calling thread thread 0 of rayon's global pool, its other threads started beside
/// it (as many in all as rayon would start: `RAYON_NUM_THREADS` or one per CPU). Call it first
/// in `main`, on the thread that will call the backend. False, and nothing changed, when the
/// pool was already started (by this call, or by any parallel loop before it).
pub fn join_global_pool() -> bool {
    rayon::ThreadPoolBuilder::new().use_current_thread().build_global().is_ok()
}
