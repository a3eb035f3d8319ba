//! The CPU op timer's tables (`backend::cpu::profile`): rows by kind and by op, and the GEMMs
//! by op and shape. Its own process: profiling is switched on once, before any op runs.

use semshare::backend::cpu::profile;

#[test]
fn the_tables_sum_by_op_and_keep_gemms_by_shape() {
    profile::enable();
    assert!(profile::enabled());
    profile::reset();
    for shape in [(7, 11, 13), (7, 11, 13), (3, 5, 9)] {
        let _timer = profile::time_gemm("gemm x·Wᵀ+b", shape);
    }
    drop(profile::time("attention_fwd"));
    let table = profile::table(1);
    let has = |row: &str| table.lines().any(|l| l.starts_with(row));
    assert!(has("| gemm x·Wᵀ+b | 3 |"), "the op's row sums its shapes:\n{table}");
    assert!(has("| attention_fwd | 1 |"), "{table}");
    assert!(has("| gemm x·Wᵀ+b | 7 × 11 × 13 | 2 |"), "{table}");
    assert!(has("| gemm x·Wᵀ+b | 3 × 5 × 9 | 1 |"), "{table}");
    assert!(!table.contains("attention_fwd | 0 × 0 × 0"), "only GEMMs are listed by shape:\n{table}");
    for kind in ["| GEMM |", "| attention |"] {
        assert!(has(kind), "{table}");
    }
    profile::reset();
    assert!(!profile::table(1).contains("gemm x·Wᵀ+b"), "reset forgets what was timed");
}
