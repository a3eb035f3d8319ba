//! `backend::cpu::threads::join_global_pool`, in a test binary of its own: the pool it starts
//! keeps the joined thread as its thread 0 for the life of the process.

use rayon::prelude::*;
use semshare::backend::cpu::threads::join_global_pool;

/// The joined thread is the pool's thread 0, a parallel loop it starts runs partly on it
/// (and gives the loop's result), and the pool is started once.
#[test]
fn the_calling_thread_joins_the_pool_and_runs_its_loops() {
    assert!(join_global_pool(), "no parallel loop ran before this one in this binary");
    assert_eq!(rayon::current_thread_index(), Some(0));
    let ran_here =
        (0..10_000u64).into_par_iter().map(|_| u64::from(rayon::current_thread_index() == Some(0))).sum::<u64>();
    assert!(ran_here > 0, "the loop ran on the joined thread");
    let sum: u64 = (0..10_000u64).into_par_iter().sum();
    assert_eq!(sum, 10_000 * 9_999 / 2);
    assert!(!join_global_pool(), "the pool is started once");
}
