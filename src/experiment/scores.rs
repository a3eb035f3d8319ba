//! What a finished run scored: the record a suite keeps of each run and the input the reports
//! summarise (the suite produces these, `report` and `plot` consume them).

use serde::{Deserialize, Serialize};

use crate::eval::metrics::{DirectionMetrics, Report};
use crate::{Error, Result};

/// The NDCG cut-off of Table 1 and Figure 1.
pub const NDCG_K: usize = 500;

/// One score in both directions and their average (×100, as `eval::Report`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Directions {
    pub i2t: f64,
    pub t2i: f64,
    pub avg: f64,
}

/// What Table 1 keeps of one run's test report: NDCG@k and mAP@all.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// The k of `ndcg` (500 in the paper).
    pub k: usize,
    pub ndcg: Directions,
    pub map_all: Directions,
}

impl Scores {
    /// Takes NDCG@k and mAP@all from a report; an error when the report has no NDCG@k or a
    /// score is not finite.
    pub fn from_report(report: &Report, k: usize) -> Result<Scores> {
        let ndcg = |d: &DirectionMetrics, name: &str| {
            d.ndcg_at(k).ok_or_else(|| Error::data(format!("the {name} report has no NDCG@{k}")))
        };
        let s = Scores {
            k,
            ndcg: Directions {
                i2t: ndcg(&report.i2t, "I2T")?,
                t2i: ndcg(&report.t2i, "T2I")?,
                avg: ndcg(&report.avg, "average")?,
            },
            map_all: Directions { i2t: report.i2t.map_all, t2i: report.t2i.map_all, avg: report.avg.map_all },
        };
        let all = [s.ndcg.i2t, s.ndcg.t2i, s.ndcg.avg, s.map_all.i2t, s.map_all.t2i, s.map_all.avg];
        if all.iter().any(|x| !x.is_finite()) {
            return Err(Error::data(format!("a run's scores are not finite: {all:?}")));
        }
        Ok(s)
    }
}
