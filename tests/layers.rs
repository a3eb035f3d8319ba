//! The layer rule of docs/ARCHITECTURE.md under `cargo test`: `tools/layers.py` passes on this
//! tree, and its self-test shows that a planted file cycle, module cycle and upward import fail.
//! Needs python3 (standard library only); skipped with a printed line without it, unless
//! `SEMSHARE_REQUIRE_PYTHON=1` (CI).

use std::path::Path;
use std::process::{Command, Output};

fn layers(args: &[&str]) -> Option<Output> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match Command::new("python3").arg(root.join("tools/layers.py")).args(args).current_dir(root).output() {
        Ok(o) => Some(o),
        Err(e) if std::env::var("SEMSHARE_REQUIRE_PYTHON").is_ok_and(|v| v == "1") => {
            panic!("SEMSHARE_REQUIRE_PYTHON=1 but python3 does not run: {e}")
        }
        Err(e) => {
            println!("skipped: python3 does not run ({e})");
            None
        }
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn src_has_no_cycle_no_upward_import_and_no_overlong_file() {
    let Some(o) = layers(&[]) else { return };
    assert!(o.status.success(), "tools/layers.py:\n{}", text(&o));
}

#[test]
fn a_planted_cycle_or_upward_import_fails_the_check() {
    let Some(o) = layers(&["--self-test"]) else { return };
    assert!(o.status.success(), "tools/layers.py --self-test:\n{}", text(&o));
    assert!(text(&o).contains("self-test: ok"), "{}", text(&o));
}
