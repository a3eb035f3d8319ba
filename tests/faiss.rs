//! FAISS agrees with `semshare query` (issue 13, item 5): tools/test_faiss.py exports an index
//! as `.npy`, loads it into `faiss.IndexFlatIP` and compares FAISS's exact top-k with
//! `semshare query --vectors` on the same vectors. Without numpy/faiss the test is skipped
//! with a printed line, unless `SEMSHARE_REQUIRE_PYTHON=1` (CI), where a missing module fails.

use std::path::Path;
use std::process::Command;

#[test]
fn faiss_exact_top_k_equals_semshare_query() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let probe = Command::new("python3").args(["-c", "import numpy, faiss"]).output();
    let why = match &probe {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("").to_string()),
        Err(e) => Some(format!("python3: {e}")),
    };
    if let Some(why) = why {
        if std::env::var("SEMSHARE_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
            panic!("SEMSHARE_REQUIRE_PYTHON=1 but python3 with numpy and faiss is missing: {why}");
        }
        println!("skipped faiss_exact_top_k_equals_semshare_query: python3 with numpy and faiss not available ({why})");
        return;
    }
    let out = Command::new("python3")
        .arg(root.join("tools/test_faiss.py"))
        .env("SEMSHARE_BIN", env!("CARGO_BIN_EXE_semshare"))
        .current_dir(root)
        .output()
        .expect("python3 runs");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tools/test_faiss.py failed:\n{log}");
    // unittest's summary: a suite that ran nothing would not say `Ran 3 tests` then OK.
    let ran = log.lines().find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse::<usize>().ok());
    assert!(ran.is_some_and(|n| n >= 3) && log.trim_end().ends_with("OK"), "unexpected unittest output:\n{log}");
}
