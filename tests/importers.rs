//! The Python importers (tools/import_dataset.py) under `cargo test`: their unittest suite builds
//! tiny inputs of every layout and checks the written source directories value by value.
//! Without numpy/scipy/h5py the suite is skipped with a printed line, unless
//! `SEMSHARE_REQUIRE_PYTHON=1` (CI), where a missing module fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Whether python3 with numpy, scipy and h5py is here; panics where CI requires it.
fn python_ready(test: &str) -> bool {
    let probe = Command::new("python3").args(["-c", "import numpy, scipy, h5py"]).output();
    let why = match &probe {
        Ok(o) if o.status.success() => return true,
        Ok(o) => String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("").to_string(),
        Err(e) => format!("python3: {e}"),
    };
    if std::env::var("SEMSHARE_REQUIRE_PYTHON").is_ok_and(|v| v == "1") {
        panic!("SEMSHARE_REQUIRE_PYTHON=1 but python3 with numpy, scipy, h5py is missing: {why}");
    }
    println!("skipped {test}: python3 with numpy, scipy, h5py not available ({why})");
    false
}

fn run_suite(keep: Option<&Path>) -> Output {
    let mut cmd = Command::new("python3");
    cmd.arg(root().join("tools/test_importers.py")).current_dir(root());
    if let Some(dir) = keep {
        cmd.env("SEMSHARE_KEEP_SOURCES", dir);
    }
    cmd.output().expect("python3 runs")
}

#[test]
fn python_importer_suite_passes_and_its_sources_follow_the_contract() {
    if !python_ready("python_importer_suite_passes_and_its_sources_follow_the_contract") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("semshare-importers-suite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = run_suite(Some(&dir));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "tools/test_importers.py failed:\n{log}");
    // unittest's summary; a suite that ran nothing would not say OK after `Ran N tests`.
    let ran = log.lines().find_map(|l| l.strip_prefix("Ran ")?.split(' ').next()?.parse::<usize>().ok());
    assert!(ran.is_some_and(|n| n >= 10), "unexpected unittest output:\n{log}");
    let kept = kept_sources(&dir);
    assert!(kept.len() >= 8, "kept sources: {kept:?}");
    for src in &kept {
        check_source(src);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn kept_sources(dir: &Path) -> Vec<PathBuf> {
    let mut kept: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    kept.sort();
    kept
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

/// The source-directory contract, read with the `safetensors` crate the Rust side uses: the
/// manifest, one consistent set of shapes over all splits, dtypes, label and vocabulary sizes.
fn check_source(src: &Path) {
    use safetensors::tensor::{Dtype, SafeTensors};
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("source.json")).unwrap()).unwrap();
    assert_eq!(doc["format"], "semshare-source", "{}", src.display());
    assert_eq!(doc["version"], 1);
    assert!(doc["name"].is_string());
    let splits = doc["splits"].as_object().unwrap();
    for need in ["train", "val", "test"] {
        assert!(splits.contains_key(need), "{}: no {need}", src.display());
    }
    let c = lines(&src.join("labels.txt")).len();
    let vocab = src.join("vocab.txt").is_file().then(|| lines(&src.join("vocab.txt")));
    if let Some(v) = &vocab {
        assert_eq!(v[..3], ["[PAD]", "[UNK]", "[MASK]"]);
    }
    let mut widths: Option<Vec<Vec<usize>>> = None;
    for (name, files) in splits {
        assert!(["train", "val", "test", "database"].contains(&name.as_str()), "{name}");
        for file in files.as_array().unwrap() {
            let path = src.join(file.as_str().unwrap());
            let bytes = std::fs::read(&path).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let what = |t: &str| format!("{}: {t}", path.display());
            let get = |t: &str| st.tensor(t).ok();
            let feats = get("image.features").unwrap_or_else(|| panic!("{}", what("image.features missing")));
            assert!([Dtype::F32, Dtype::F16, Dtype::BF16].contains(&feats.dtype()), "{}", what("image.features"));
            let [n, r, dr] = feats.shape()[..] else { panic!("{}", what("image.features rank")) };
            let shape = |t: &str, dtype: Dtype, want: &[usize]| {
                let v = get(t).unwrap_or_else(|| panic!("{}", what(&format!("{t} missing"))));
                assert_eq!((v.dtype(), v.shape()), (dtype, want), "{}", what(t));
                v
            };
            shape("image.boxes", Dtype::F32, &[n, r, 5]);
            shape("image.count", Dtype::U16, &[n]);
            shape("labels", Dtype::U8, &[n, c]);
            if get("image.classes").is_some() {
                shape("image.classes", Dtype::U16, &[n, r]);
                assert!(doc["num_object_classes"].as_u64().is_some_and(|k| k > 0), "{}", what("num_object_classes"));
            }
            let length = get("text.length").unwrap_or_else(|| panic!("{}", what("text.length missing")));
            let m = length.shape()[0];
            let t = match (get("text.tokens"), get("text.features")) {
                (Some(tok), None) => {
                    assert_eq!(tok.dtype(), Dtype::U32, "{}", what("text.tokens"));
                    let v = vocab.as_ref().unwrap_or_else(|| panic!("{}", what("vocab.txt missing")));
                    let ids = tok.data().chunks_exact(4).map(|b| u32::from_le_bytes(b.try_into().unwrap()));
                    assert!(ids.max().unwrap_or(0) < v.len() as u32, "{}", what("token id ≥ vocabulary size"));
                    vec![tok.shape()[1]]
                }
                (None, Some(f)) => f.shape()[1..].to_vec(),
                _ => panic!("{}", what("exactly one of text.tokens, text.features")),
            };
            shape("text.length", Dtype::U16, &[m]);
            if m != n {
                shape("text.item", Dtype::U32, &[m]);
            }
            let w = vec![vec![r, dr], t];
            assert!(widths.get_or_insert_with(|| w.clone()) == &w, "{}", what("widths differ between splits"));
        }
    }
}

/// Every source directory the importers write is accepted by `semshare pack` and the packed
/// dataset by `semshare check`.
#[test]
fn imported_sources_pack_and_check() {
    if !python_ready("imported_sources_pack_and_check") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("semshare-importers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let sources = dir.join("sources");
    std::fs::create_dir_all(&sources).unwrap();
    let out = run_suite(Some(&sources));
    assert!(out.status.success(), "tools/test_importers.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let kept = kept_sources(&sources);
    // One per layout at least: numpy (npz, npy folder, tags), mat (v5, v7.3, authors'), scan, flickr.
    assert!(kept.len() >= 8, "kept sources: {kept:?}");
    let semshare = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_semshare")).args(args).output().unwrap();
    for src in &kept {
        let packed = dir.join("packed").join(src.file_name().unwrap());
        let pack = semshare(&["pack", "--from", src.to_str().unwrap(), "--out", packed.to_str().unwrap()]);
        assert!(pack.status.success(), "pack {}: {}", src.display(), String::from_utf8_lossy(&pack.stderr));
        let check = semshare(&["check", packed.to_str().unwrap()]);
        assert!(check.status.success(), "check {}: {}", packed.display(), String::from_utf8_lossy(&check.stderr));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
