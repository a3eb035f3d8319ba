//! `semshare index`, `query` and `export` end to end (issue 13, items 3 and 5): a tiny model
//! trained on a synthetic dataset indexes both sides of a split; queries in both directions
//! return the brute-force f64 ranking; `--append`, refusals (another model, a damaged file, an
//! output that is not ours) and the export round trip.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::cli::{fails_with, ok, path, semshare, snapshot, tmp, usage_error};
use semshare::backend::cpu::Cpu;
use semshare::checkpoint::Checkpoint;
use semshare::data::reader::DatasetReader;
use semshare::data::synth::{SynthConfig, SynthPreset, generate};
use semshare::index::npy::{read_npy, write_npy};
use semshare::index::{Index, Origin};
use semshare::inference::Regions;
use semshare::train::{RunOptions, TrainConfig, train};
use semshare::{Model, backend::open};

/// A dataset (`data/`) and a model trained on it for four steps, made once for all tests.
struct Fixture {
    data: PathBuf,
    ckpt: PathBuf,
    /// The same model with one parameter changed: another fingerprint.
    other: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        // The fixture outlives every test (a static has no drop): earlier runs' are removed here
        // (`semshare-index-PID-…` of a process gone).
        for entry in std::fs::read_dir(std::env::temp_dir()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("semshare-index-").and_then(|r| r.split('-').next()?.parse::<u32>().ok());
            if cfg!(target_os = "linux") && pid.is_some_and(|p| !Path::new("/proc").join(p.to_string()).exists()) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
        let dir = tmp("index", "fixture");
        let mut cfg = SynthConfig::preset(SynthPreset::Balanced, 11);
        (cfg.train, cfg.val, cfg.test) = (32, 12, 40);
        (cfg.feature_dim, cfg.vocab_size, cfg.max_tokens, cfg.regions) = (12, 40, 8, 5);
        let data = generate(&cfg).unwrap();
        data.save(dir.join("data")).unwrap();
        let reader = std::sync::Arc::new(DatasetReader::open(dir.join("data")).unwrap());
        let model = common::tiny_model_of(&data.meta, 0);
        let train_cfg = TrainConfig { steps: 4, batch_size: 8, eval_every: 2, warmup: 1, ..TrainConfig::default() };
        let opts = RunOptions::new(dir.join("run"));
        let summary = train(&mut Cpu::new(), &reader, &model, &train_cfg, &opts).unwrap();
        let ckpt = summary.best_checkpoint.unwrap();
        let mut c = Checkpoint::load(&ckpt).unwrap();
        c.params[0] += 0.5;
        let other = dir.join("other.safetensors");
        c.save(&other).unwrap();
        Fixture { data: dir.join("data"), ckpt, other }
    })
}

fn model(ckpt: &Path) -> Model {
    Model::load(ckpt, open("cpu").unwrap()).unwrap()
}

/// Builds `out` with `semshare index` and the given source flags.
fn index(f: &Fixture, out: &Path, source: &[&str]) -> String {
    let mut a = vec!["index", "--checkpoint", path(&f.ckpt), "--out", path(out), "--device", "cpu"];
    a.extend_from_slice(source);
    ok(&semshare(&a))
}

/// One parsed `--json` line per query: (query, [(id, score)]).
fn parse_json(stdout: &str) -> Vec<(serde_json::Value, Vec<(String, f64)>)> {
    stdout
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let hits = v["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| (h["id"].as_str().unwrap().to_string(), h["score"].as_f64().unwrap()))
                .collect();
            (v["query"].clone(), hits)
        })
        .collect()
}

/// The definition in f64: every item scored, sorted by score descending then item ascending.
fn brute_force(index: &Index, query: &[f32]) -> Vec<(usize, f64)> {
    let d = index.dim();
    let mut all: Vec<(usize, f64)> = index
        .vectors()
        .chunks_exact(d)
        .enumerate()
        .map(|(i, g)| (i, g.iter().zip(query).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum()))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all
}

/// `got` is a top-k of `query`: the f64 ranking's ids where its scores are apart by more than
/// f32 rounding, the same scores to 1e-5, and nothing left out that scores better.
fn assert_top_k(index: &Index, query: &[f32], got: &[(String, f64)], k: usize) {
    let want = brute_force(index, query);
    assert_eq!(got.len(), k.min(index.len()));
    let score_of = |id: &str| want.iter().find(|(i, _)| index.id(*i) == Some(id)).map(|w| w.1).unwrap();
    for (r, (id, score)) in got.iter().enumerate() {
        assert!((score - score_of(id)).abs() < 1e-5, "rank {r}: {id} scored {score}, f64 says {}", score_of(id));
        let (wi, ws) = want[r];
        // Same item, or a near tie that f32 rounding may order either way.
        assert!(
            index.id(wi) == Some(id) || (ws - score_of(id)).abs() < 1e-6,
            "rank {r}: got {id}, expected {:?}",
            index.id(wi)
        );
    }
    let worst = got.iter().map(|(id, _)| score_of(id)).fold(f64::INFINITY, f64::min);
    let best_left =
        want.iter().filter(|(i, _)| !got.iter().any(|(id, _)| index.id(*i) == Some(id.as_str()))).map(|w| w.1).next();
    assert!(best_left.is_none_or(|b| b <= worst + 1e-6), "an item scoring {best_left:?} > {worst} was left out");
}

#[test]
fn both_sides_are_indexed_and_queried_in_both_directions_as_brute_force_ranks() {
    let f = fixture();
    let dir = tmp("index", "both");
    let (images, texts) = (dir.join("images.idx"), dir.join("texts.idx"));
    let said = index(f, &images, &["--data", path(&f.data), "--split", "test"]);
    assert!(said.contains("40 image items"), "{said}");
    index(f, &texts, &["--data", path(&f.data), "--split", "test", "--side", "text"]);
    let (ii, ti) = (Index::open(&images).unwrap(), Index::open(&texts).unwrap());
    assert_eq!(
        (ii.len(), ii.id(7), ii.labels(0).map(<[u8]>::len)),
        (40, Some("test/7"), Some(ii.label_names().unwrap().len()))
    );
    assert!(ti.id(3).unwrap().starts_with("test/text/"));
    let mut m = model(&f.ckpt);
    assert!(matches!(ii.origin(), Origin::Model { fingerprint, .. } if fingerprint == m.fingerprint()));
    // The index holds the model's embeddings of the split, normalised.
    let reader = DatasetReader::open(&f.data).unwrap();
    let (want_images, _) = m.embed_split(&reader.layout, reader.split("test").unwrap()).unwrap();
    assert_eq!(ii.vectors(), &want_images.values[..]);

    // Texts against the image gallery.
    let vocab: Vec<String> =
        std::fs::read_to_string(f.data.join("vocab.txt")).unwrap().lines().map(String::from).collect();
    let queries = [format!("{} {}", vocab[3], vocab[9]), format!("{}, {}!", vocab[20], vocab[4]), vocab[30].clone()];
    let mut a = vec!["query", "--checkpoint", path(&f.ckpt), "--index", path(&images), "--k", "7", "--json"];
    queries.iter().for_each(|q| a.extend(["--text", q.as_str()]));
    let answers = parse_json(&ok(&semshare(&a)));
    assert_eq!(answers.len(), 3);
    let emb = m.embed_texts(&queries).unwrap();
    for (i, (q, hits)) in answers.iter().enumerate() {
        assert_eq!(q.as_str(), Some(queries[i].as_str()));
        assert_top_k(&ii, emb.row(i), hits, 7);
    }
    // The same from a file of queries, in plain text.
    std::fs::write(dir.join("q.txt"), queries.join("\n")).unwrap();
    let plain = ok(&semshare(&[
        "query",
        "--checkpoint",
        path(&f.ckpt),
        "--index",
        path(&images),
        "--queries",
        path(&dir.join("q.txt")),
    ]));
    assert_eq!(plain.lines().filter(|l| l.starts_with("query ")).count(), 3);
    assert!(plain.contains(&format!("  1  {:.6}  {}", answers[0].1[0].1, answers[0].1[0].0)), "{plain}");

    // Images (region features; the second has a padded last region) against the text gallery.
    let dr = m.config().region_dim;
    let mut feats: Vec<f32> = (0..3 * 4 * dr).map(|i| ((i * 37 % 101) as f32 / 50.0) - 1.0).collect();
    feats[(4 + 3) * dr..(4 + 4) * dr].iter_mut().for_each(|x| *x = 0.0);
    write_npy(&dir.join("q.npy"), &feats, &[3, 4, dr]).unwrap();
    let out = ok(&semshare(&[
        "query",
        "--checkpoint",
        path(&f.ckpt),
        "--index",
        path(&texts),
        "--features",
        path(&dir.join("q.npy")),
        "--k",
        "50",
        "--json",
    ]));
    let answers = parse_json(&out);
    let regions = [&feats[..4 * dr], &feats[4 * dr..7 * dr], &feats[8 * dr..]];
    let emb = m.embed_images(&regions.map(Regions::new)).unwrap();
    for (i, (q, hits)) in answers.iter().enumerate() {
        assert_eq!(q.as_u64(), Some(i as u64));
        assert_top_k(&ti, emb.row(i), hits, 50); // k above the gallery: all 40 texts
    }

    // Pre-computed vectors: the index's own rows find themselves first.
    write_npy(&dir.join("v.npy"), &ii.vectors()[..2 * ii.dim()], &[2, ii.dim()]).unwrap();
    let out = parse_json(&ok(&semshare(&[
        "query",
        "--index",
        path(&images),
        "--vectors",
        path(&dir.join("v.npy")),
        "--json",
    ])));
    assert_eq!((out[0].1[0].0.as_str(), out[1].1[0].0.as_str()), ("test/0", "test/1"));
    for (i, (_, hits)) in out.iter().enumerate() {
        assert_top_k(&ii, &ii.vectors()[i * ii.dim()..(i + 1) * ii.dim()], hits, 10);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn append_adds_new_ids_of_the_same_model_only() {
    let f = fixture();
    let dir = tmp("index", "append");
    let idx = dir.join("g.idx");
    index(f, &idx, &["--data", path(&f.data), "--split", "test"]);
    let said = index(f, &idx, &["--data", path(&f.data), "--split", "val", "--append"]);
    assert!(said.contains("12 image items") && said.contains("52 in all"), "{said}");
    let g = Index::open(&idx).unwrap();
    assert_eq!((g.len(), g.id(39), g.id(40), g.id(51)), (52, Some("test/39"), Some("val/0"), Some("val/11")));
    let before = std::fs::read(&idx).unwrap();
    let again = [
        "index",
        "--checkpoint",
        path(&f.ckpt),
        "--out",
        path(&idx),
        "--data",
        path(&f.data),
        "--split",
        "val",
        "--append",
    ];
    fails_with(&semshare(&again), "item id `val/0` is already in the index");
    let texts = [
        "index",
        "--checkpoint",
        path(&f.ckpt),
        "--out",
        path(&idx),
        "--data",
        path(&f.data),
        "--split",
        "train",
        "--side",
        "text",
        "--append",
    ];
    fails_with(&semshare(&texts), "cannot append text items");
    let other = [
        "index",
        "--checkpoint",
        path(&f.other),
        "--out",
        path(&idx),
        "--data",
        path(&f.data),
        "--split",
        "train",
        "--append",
    ];
    fails_with(&semshare(&other), "cannot append");
    // While another append holds the index, a second is refused: it would write the index
    // without the first one's items.
    let held = std::fs::File::open(&idx).unwrap();
    held.try_lock().unwrap();
    let mut train = again;
    train[8] = "train";
    fails_with(&semshare(&train), "another `semshare index --append` is adding to this index");
    drop(held);
    assert_eq!(std::fs::read(&idx).unwrap(), before, "a refused append leaves the index as it was");
    // Texts from files, the second with its own ids, appended; labelled items do not mix in.
    let t = dir.join("t.idx");
    std::fs::write(dir.join("captions.txt"), "a b c\nd e\n").unwrap();
    std::fs::write(dir.join("more.txt"), "f g\nh\n").unwrap();
    std::fs::write(dir.join("ids.txt"), "cap-1\ncap-2\n").unwrap();
    index(f, &t, &["--texts", path(&dir.join("captions.txt"))]);
    index(f, &t, &["--texts", path(&dir.join("more.txt")), "--ids", path(&dir.join("ids.txt")), "--append"]);
    let labelled = [
        "index",
        "--checkpoint",
        path(&f.ckpt),
        "--out",
        path(&t),
        "--data",
        path(&f.data),
        "--side",
        "text",
        "--append",
    ];
    fails_with(&semshare(&labelled), "labels to an index with no labels");
    let t = Index::open(&t).unwrap();
    assert_eq!((t.len(), t.id(1), t.id(3), t.labels(0)), (4, Some("captions/1"), Some("cap-2"), None));
    fails_with(
        &semshare(&[
            "index",
            "--checkpoint",
            path(&f.ckpt),
            "--out",
            path(&dir.join("none.idx")),
            "--texts",
            path(&dir.join("captions.txt")),
            "--append",
        ]),
        "does not exist yet",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn another_models_index_and_bad_queries_are_refused_with_one_line() {
    let f = fixture();
    let dir = tmp("index", "refuse");
    let idx = dir.join("g.idx");
    index(f, &idx, &["--data", path(&f.data), "--split", "test"]);
    let q = |extra: &[&str]| {
        let mut a = vec!["query", "--index", path(&idx)];
        a.extend_from_slice(extra);
        semshare(&a)
    };
    let out = q(&["--checkpoint", path(&f.other), "--text", "x"]);
    fails_with(&out, "other.safetensors");
    let line = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(line.contains(path(&idx)) && line.contains(path(&f.ckpt)), "names both files: {line}");
    let ck = path(&f.ckpt);
    fails_with(&q(&["--checkpoint", ck, "--text", "?!"]), "has no word");
    std::fs::write(dir.join("q.txt"), "one\n\nthree\n").unwrap();
    fails_with(&q(&["--checkpoint", ck, "--queries", path(&dir.join("q.txt"))]), "line 2 is empty");
    fails_with(
        &semshare(&["query", "--index", path(&dir.join("nope.idx")), "--checkpoint", ck, "--text", "a"]),
        "nope.idx",
    );
    write_npy(&dir.join("v.npy"), &[0.5; 17], &[1, 17]).unwrap();
    fails_with(&q(&["--vectors", path(&dir.join("v.npy"))]), "dimension 16");
    fails_with(&q(&["--checkpoint", ck, "--text", "a", "--k", "0"]), "--k must be at least 1");
    fails_with(&q(&["--checkpoint", ck]), "give one kind of query");
    fails_with(
        &q(&["--checkpoint", ck, "--text", "a", "--vectors", path(&dir.join("v.npy"))]),
        "give one kind of query",
    );
    usage_error(&q(&["--text"]), "--text needs a value");
    fails_with(&q(&["--checkpoint", ck, "--text", "a", "--side", "image"]), "--side says what --features are");
    // A raw-vectors index has no model to embed a text for.
    write_npy(&dir.join("g.npy"), &[0.6, 0.8, 1.0, 0.0], &[2, 2]).unwrap();
    ok(&semshare(&["index", "--vectors", path(&dir.join("g.npy")), "--out", path(&dir.join("raw.idx"))]));
    let raw = semshare(&["query", "--index", path(&dir.join("raw.idx")), "--checkpoint", ck, "--text", "a"]);
    fails_with(&raw, "holds raw vectors");
    // Arrays with no values (found by the `npy` fuzz target): 2⁴⁰ rows of nothing once had
    // ids made for each (the process aborted out of memory), items of no segments divided by 0.
    write_npy(&dir.join("rows.npy"), &[], &[1 << 40, 0]).unwrap();
    let out = dir.join("none.idx");
    fails_with(&semshare(&["index", "--vectors", path(&dir.join("rows.npy")), "--out", path(&out)]), "holds no values");
    write_npy(&dir.join("f.npy"), &[], &[2, 0, 16]).unwrap();
    let f_npy = dir.join("f.npy");
    let features = ["--checkpoint", ck, "--features", path(&f_npy)];
    fails_with(&semshare(&[&["index", "--out", path(&out)][..], &features].concat()), "holds no values");
    fails_with(&q(&features), "holds no values");
    assert!(!out.exists(), "nothing written");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn damaged_index_files_are_refused_naming_the_file() {
    let f = fixture();
    let dir = tmp("index", "damaged");
    let idx = dir.join("g.idx");
    index(f, &idx, &["--data", path(&f.data), "--split", "test"]);
    let bytes = std::fs::read(&idx).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let data0 = 8 + header_len;
    let emb = data0 + meta.info("embeddings").unwrap().data_offsets.0;
    let ids = data0 + meta.info("ids.offsets").unwrap().data_offsets.0;
    let mut nan = bytes.clone();
    nan[emb + 4 * 17..emb + 4 * 18].copy_from_slice(&f32::NAN.to_le_bytes());
    let mut long = bytes.clone();
    long[emb..emb + 4].copy_from_slice(&3.0f32.to_le_bytes());
    let mut offsets = bytes.clone();
    offsets[ids + 8..ids + 16].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut format = bytes.clone();
    // Quoted: the fixture's directory name holds `semshare-index-` too.
    let at = format.windows(18).position(|w| w == b"\"semshare-index-1\"").unwrap();
    format[at + 16] = b'9';
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("truncated", bytes[..bytes.len() - 5].to_vec(), "truncated or corrupt"),
        ("empty", Vec::new(), "truncated"),
        ("nan", nan, "row 1 holds a non-finite value"),
        ("unnormalised", long, "row 0 has norm"),
        ("offsets", offsets, "ids.offsets"),
        ("format", format, "semshare-index-9"),
    ];
    for (name, bad, needle) in cases {
        let p = dir.join(format!("{name}.idx"));
        std::fs::write(&p, bad).unwrap();
        let out = semshare(&["query", "--index", path(&p), "--checkpoint", path(&f.ckpt), "--text", "a"]);
        fails_with(&out, needle);
        assert!(String::from_utf8_lossy(&out.stderr).contains(path(&p)), "{name}: names the file");
        fails_with(
            &semshare(&["export", "--index", path(&p), "--format", "npy", "--out", path(&dir.join("x.npy"))]),
            needle,
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn outputs_are_replaced_only_when_ours_and_forced() {
    let f = fixture();
    let dir = tmp("index", "outputs");
    let idx = dir.join("g.idx");
    index(f, &idx, &["--data", path(&f.data), "--split", "test"]);
    let again =
        ["index", "--checkpoint", path(&f.ckpt), "--out", path(&idx), "--data", path(&f.data), "--split", "val"];
    fails_with(&semshare(&again), "--force");
    let mut forced = again.to_vec();
    forced.push("--force");
    ok(&semshare(&forced));
    assert_eq!(Index::open(&idx).unwrap().id(0), Some("val/0"));
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    fails_with(
        &semshare(&[
            "index",
            "--checkpoint",
            path(&f.ckpt),
            "--out",
            path(&dir.join("notes.txt")),
            "--data",
            path(&f.data),
            "--force",
        ]),
        "not a gallery index written by semshare",
    );
    let onto_input =
        ["index", "--checkpoint", path(&f.ckpt), "--out", path(&f.ckpt), "--data", path(&f.data), "--force"];
    fails_with(&semshare(&onto_input), "may not overwrite an input");
    for format in ["npy", "jsonl"] {
        let out = semshare(&[
            "export",
            "--index",
            path(&idx),
            "--format",
            format,
            "--out",
            path(&dir.join("notes.txt")),
            "--force",
        ]);
        fails_with(&out, "refusing to replace it");
    }
    std::fs::write(dir.join("e.ids.txt"), "someone's\n").unwrap();
    fails_with(
        &semshare(&["export", "--index", path(&idx), "--format", "npy", "--out", path(&dir.join("e.npy"))]),
        "e.ids.txt",
    );
    assert!(!dir.join("e.npy").exists(), "nothing written when one output is refused");
    let before = snapshot(&dir);
    fails_with(
        &semshare(&["export", "--index", path(&idx), "--format", "csv", "--out", path(&dir.join("x"))]),
        "expected npy or jsonl",
    );
    assert_eq!(snapshot(&dir), before);

    // Files that only look like exports: a user's array with no ids beside it, another tool's
    // JSON lines; a directory where the export's file would go; a link --append would replace.
    // Of the export's own shapes: an array with as many ids beside it as it has rows, lines of
    // `id`, `vector` and `payload` (only the export's manifest makes them ours).
    semshare::index::npy::write_npy(&dir.join("mine.npy"), &[1.0, 2.0, 3.0, 4.0], &[2, 2]).unwrap();
    std::fs::write(dir.join("mine.ids.txt"), "a\nb\n").unwrap();
    std::fs::write(dir.join("dump.jsonl"), "{\"id\": \"a\", \"vector\": [1.0], \"payload\": {}}\n").unwrap();
    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let before = snapshot(&dir);
    let export = |format: &str, out: &str| {
        semshare(&["export", "--index", path(&idx), "--format", format, "--out", path(&dir.join(out)), "--force"])
    };
    fails_with(&export("npy", "mine.npy"), "not a .npy export written by semshare");
    fails_with(&export("jsonl", "dump.jsonl"), "not a JSON-lines export written by semshare");
    fails_with(&export("npy", "empty"), "is a directory; the .npy export is a file");
    let link = dir.join("link.idx");
    std::os::unix::fs::symlink(&idx, &link).unwrap();
    let append = [
        "index",
        "--checkpoint",
        path(&f.ckpt),
        "--out",
        path(&link),
        "--data",
        path(&f.data),
        "--split",
        "train",
        "--append",
    ];
    fails_with(&semshare(&append), "is a symbolic link");
    std::fs::remove_file(&link).unwrap();
    assert_eq!(snapshot(&dir), before);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn raw_vectors_need_a_direction_and_no_checkpoint() {
    let dir = tmp("index", "raw");
    let npy = dir.join("v.npy");
    semshare::index::npy::write_npy(&npy, &[1.0, 0.0, 0.0, 0.0, 0.5, 0.5], &[3, 2]).unwrap();
    let out = dir.join("v.idx");
    fails_with(&semshare(&["index", "--vectors", path(&npy), "--out", path(&out)]), "vector 1 is all zeros");
    let ids = dir.join("ids.txt");
    std::fs::write(&ids, "a\nb\na\n").unwrap();
    let dup = semshare(&["index", "--vectors", path(&npy), "--ids", path(&ids), "--out", path(&out)]);
    fails_with(&dup, "ids.txt: id `a` appears twice (lines 1 and 3)");
    semshare::index::npy::write_npy(&npy, &[1.0, 0.0, 0.0, 2.0, 0.5, 0.5], &[3, 2]).unwrap();
    ok(&semshare(&["index", "--vectors", path(&npy), "--out", path(&out)]));
    let f = fixture();
    let q = ["query", "--index", path(&out), "--vectors", path(&npy), "--checkpoint", path(&f.ckpt)];
    fails_with(&semshare(&q), "holds raw vectors, made by no model");
    ok(&semshare(&q[..5]));
    let huge = dir.join("huge.npy");
    semshare::index::npy::write_npy(&huge, &[1.0, 0.0, 3e38, 3e38], &[2, 2]).unwrap();
    fails_with(
        &semshare(&["query", "--index", path(&out), "--vectors", path(&huge)]),
        "huge.npy: query vector 1 has norm",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn export_round_trips_vectors_ids_and_labels() {
    let f = fixture();
    let dir = tmp("index", "export");
    let idx = dir.join("g.idx");
    index(f, &idx, &["--data", path(&f.data), "--split", "test", "--side", "text"]);
    let g = Index::open(&idx).unwrap();
    let npy = dir.join("gallery.npy");
    ok(&semshare(&["export", "--index", path(&idx), "--format", "npy", "--out", path(&npy)]));
    let a = read_npy(&npy).unwrap();
    assert_eq!((a.shape.as_slice(), a.values.as_slice()), (&[g.len(), g.dim()][..], g.vectors()));
    let ids: Vec<String> =
        std::fs::read_to_string(dir.join("gallery.ids.txt")).unwrap().lines().map(String::from).collect();
    assert_eq!(ids, g.ids().map(String::from).collect::<Vec<_>>());
    // Again with --force: replaces the export it wrote, as its manifest lists it.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("gallery.npy.export.json")).unwrap()).unwrap();
    let files: Vec<&str> = manifest["files"].as_array().unwrap().iter().map(|f| f["file"].as_str().unwrap()).collect();
    assert_eq!(files, ["gallery.npy", "gallery.ids.txt"]);
    let force =
        |out: &Path| semshare(&["export", "--index", path(&idx), "--format", "npy", "--out", path(out), "--force"]);
    ok(&force(&npy));
    // Not once edited since: it is then the user's.
    let mut ids_text = std::fs::read_to_string(dir.join("gallery.ids.txt")).unwrap();
    ids_text = ids_text.replacen('\n', " (renamed)\n", 1);
    std::fs::write(dir.join("gallery.ids.txt"), &ids_text).unwrap();
    fails_with(&force(&npy), "gallery.ids.txt: is a file of");
    assert_eq!(std::fs::read_to_string(dir.join("gallery.ids.txt")).unwrap(), ids_text);
    std::fs::remove_file(dir.join("gallery.ids.txt")).unwrap();
    ok(&force(&npy));

    let jsonl = dir.join("g.jsonl");
    ok(&semshare(&["export", "--index", path(&idx), "--format", "jsonl", "--out", path(&jsonl)]));
    let text = std::fs::read_to_string(&jsonl).unwrap();
    let names = g.label_names().unwrap();
    assert_eq!(text.lines().count(), g.len());
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["id"].as_str(), g.id(i));
        let vector: Vec<f32> = v["vector"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
        assert_eq!(vector, &g.vectors()[i * g.dim()..(i + 1) * g.dim()], "item {i}: floats round-trip exactly");
        let labels: Vec<&str> =
            v["payload"]["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
        let want: Vec<&str> =
            g.labels(i).unwrap().iter().zip(names).filter(|(on, _)| **on == 1).map(|(_, n)| n.as_str()).collect();
        assert_eq!(labels, want);
    }
    // An unlabelled index exports an empty payload.
    write_npy(&dir.join("v.npy"), &[3.0, 4.0, 0.0, 2.0], &[2, 2]).unwrap();
    ok(&semshare(&["index", "--vectors", path(&dir.join("v.npy")), "--out", path(&dir.join("v.idx"))]));
    ok(&semshare(&[
        "export",
        "--index",
        path(&dir.join("v.idx")),
        "--format",
        "jsonl",
        "--out",
        path(&dir.join("v.jsonl")),
    ]));
    let first: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(dir.join("v.jsonl")).unwrap().lines().next().unwrap()).unwrap();
    assert_eq!(first, serde_json::json!({"id": "v/0", "vector": [0.6, 0.8], "payload": {}}));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn embed_writes_unit_rows_and_score_still_reads_them() {
    let f = fixture();
    let dir = tmp("index", "embed");
    let out = dir.join("e.safetensors");
    ok(&semshare(&[
        "embed",
        "--data",
        path(&f.data),
        "--checkpoint",
        path(&f.ckpt),
        "--out",
        path(&out),
        "--device",
        "cpu",
    ]));
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in ["image.embedding", "text.embedding"] {
        let t = st.tensor(name).unwrap();
        let v = semshare::io::bytes_to_f32(t.data());
        for (i, row) in v.chunks_exact(t.shape()[1]).enumerate() {
            let norm = row.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{name} row {i}: norm {norm}");
        }
    }
    // score ranks them as eval does.
    let scored = ok(&semshare(&["score", "--embeddings", path(&out), "--json"]));
    let evaluated =
        ok(&semshare(&["eval", "--data", path(&f.data), "--checkpoint", path(&f.ckpt), "--json", "--device", "cpu"]));
    assert_eq!(scored, evaluated);
    // Another producer's file (the same tensors, no mark of ours): score reads it, and embed
    // --force does not replace it.
    let theirs = dir.join("theirs.safetensors");
    std::fs::write(&theirs, safetensors::serialize(st.tensors(), None).unwrap()).unwrap();
    assert_eq!(ok(&semshare(&["score", "--embeddings", path(&theirs), "--json"])), scored);
    let mut again = vec!["embed", "--data", path(&f.data), "--checkpoint", path(&f.ckpt), "--device", "cpu"];
    again.extend(["--force", "--out", path(&theirs)]);
    fails_with(&semshare(&again), "not an embeddings file written by semshare");
    again.pop();
    again.push(path(&out));
    ok(&semshare(&again));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_feature_file_gallery_needs_no_labels() {
    let f = fixture();
    let dir = tmp("index", "features");
    let mut m = model(&f.ckpt);
    let dr = m.config().region_dim;
    let feats: Vec<f32> = (0..5 * 2 * dr).map(|i| ((i * 13 % 29) as f32 / 14.0) - 1.0).collect();
    write_npy(&dir.join("gallery.npy"), &feats, &[5, 2, dr]).unwrap();
    let idx = dir.join("g.idx");
    index(f, &idx, &["--features", path(&dir.join("gallery.npy"))]);
    let g = Index::open(&idx).unwrap();
    assert_eq!((g.len(), g.id(4), g.labels(0)), (5, Some("gallery/4"), None));
    let regions: Vec<Regions> = feats.chunks_exact(2 * dr).map(Regions::new).collect();
    assert_eq!(g.vectors(), m.embed_images(&regions).unwrap().values.as_slice());
    write_npy(&dir.join("zero.npy"), &vec![0.0; 2 * dr], &[1, 2, dr]).unwrap();
    fails_with(
        &semshare(&[
            "index",
            "--checkpoint",
            path(&f.ckpt),
            "--out",
            path(&dir.join("z.idx")),
            "--features",
            path(&dir.join("zero.npy")),
        ]),
        "feature item 0 is all zeros",
    );
    fails_with(
        &semshare(&[
            "index",
            "--checkpoint",
            path(&f.ckpt),
            "--out",
            path(&dir.join("z.idx")),
            "--features",
            "a.npy",
            "--texts",
            "b",
        ]),
        "give one source",
    );
    // Segments of another width were once cut into the model's: any multiple of its width
    // embedded (and ranked) garbage without a word.
    let (wide, z, g) = (dir.join("wide.npy"), dir.join("z.idx"), dir.join("gallery.npy"));
    write_npy(&wide, &feats, &[5, 2 * dr]).unwrap();
    let (wide, z, g, ck) = (path(&wide), path(&z), path(&g), path(&f.ckpt));
    let widths = format!("segments of {} values, but the model's image regions have {dr}", 2 * dr);
    fails_with(&semshare(&["index", "--checkpoint", ck, "--out", z, "--features", wide]), &widths);
    fails_with(&semshare(&["query", "--index", path(&idx), "--checkpoint", ck, "--features", wide]), &widths);
    // More segments an item than the model takes: the error names the file's shape, not a
    // library call.
    let most = m.config().max_regions;
    let many = dir.join("many.npy");
    write_npy(&many, &vec![0.5; 5 * (most + 1) * dr], &[5, most + 1, dr]).unwrap();
    let too_many = format!(
        "many.npy: bad input: feature item 0 has {} segments (of shape [5, {}, {dr}], trailing all-zero segments left out), but the model's images have at most {most}",
        most + 1,
        most + 1
    );
    fails_with(&semshare(&["query", "--index", path(&idx), "--checkpoint", ck, "--features", path(&many)]), &too_many);
    let as_texts = ["index", "--checkpoint", ck, "--out", z, "--features", g, "--side", "text"];
    fails_with(&semshare(&as_texts), "the model reads texts as words");
    assert!(!dir.join("z.idx").exists());
    // A model trained on text features takes no words; the command line says how to give texts.
    let cfg = semshare::model::ModelConfig { text_feature_dim: 5, ..m.config().clone() };
    let params = semshare::model::SemShare::new(&cfg).unwrap().store.init_values(1);
    let spec = semshare::checkpoint::InferenceSpec { inputs: None, ..m.spec().clone() };
    let text_features = dir.join("text-features.safetensors");
    Checkpoint { model: cfg, params, optimizer: None, step: 0, state: String::new(), spec }
        .save(&text_features)
        .unwrap();
    let (tf, lines) = (path(&text_features), dir.join("texts.txt"));
    std::fs::write(&lines, "sky\n").unwrap();
    let hint = "not words: give them with --features FILE.npy --side text";
    fails_with(&semshare(&["index", "--checkpoint", tf, "--out", z, "--texts", path(&lines)]), hint);
    let (g, out) = (dir.join("gallery.npy"), dir.join("z.idx"));
    let (g, out) = (path(&g), path(&out));
    let ck = path(&f.ckpt);
    fails_with(&semshare(&["index", "--vectors", g, "--out", out, "--checkpoint", ck]), "--checkpoint does not apply");
    fails_with(&semshare(&["index", "--vectors", g, "--out", out, "--side", "text"]), "--side does not apply");
    fails_with(
        &semshare(&["index", "--features", g, "--out", out, "--checkpoint", ck, "--split", "val"]),
        "--split does not apply",
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
