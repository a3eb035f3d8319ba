//! `semshare check DIR`: full validation of a dataset.

use semshare::data::reader::DatasetReader;
use semshare::{Error, Result};

/// Every problem found, one per line; an error (exit 1) when there is any.
pub fn run(dir: &str) -> Result<()> {
    const LIMIT: usize = 100;
    let data = DatasetReader::open(dir)?;
    let problems = data.check(LIMIT);
    for p in &problems {
        eprintln!("{p}");
    }
    if problems.is_empty() {
        let counts: Vec<String> =
            data.splits().iter().map(|s| format!("{} {}/{}", s.name, s.num_images(), s.num_texts())).collect();
        println!("{dir}: ok ({} images/texts)", counts.join(", "));
        Ok(())
    } else {
        let more = if problems.len() == LIMIT { " (stopped counting)" } else { "" };
        Err(Error::data(format!("{dir}: {} problem(s){more}", problems.len())))
    }
}
