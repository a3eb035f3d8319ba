//! The training loader: a background thread assembles the batches of steps `start..end`
//! (seeded [`PairSampler`] order) into a fixed pool of reusable buffers while the caller trains
//! on the previous one.
//!
//! - Bounded memory: `pool` buffers exist, no more; the thread waits for a free one. Buffers keep
//!   their capacity, so after the first round nothing is allocated (and, later, they can be
//!   pinned once for GPU copies).
//! - Errors (a NaN feature, a bad token) come back from [`Loader::next_batch`] naming file, tensor and
//!   item; the thread stops after the first.
//! - Dropping the loader stops the thread and joins it.

use std::ops::{Deref, Range};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::JoinHandle;

use super::batches::{PairSampler, RawImages, RawTexts};
use super::reader::DatasetReader;
use crate::{Error, Result};

/// One step's pairs: image i of the batch goes with text i.
#[derive(Debug, Default)]
pub struct PairBatch {
    pub step: u64,
    pub images: RawImages,
    pub texts: RawTexts,
    image_ids: Vec<usize>,
    text_ids: Vec<usize>,
}

/// A batch on loan from the pool; returned when dropped.
pub struct Lease<'a> {
    batch: Option<PairBatch>,
    free: &'a Sender<PairBatch>,
}

impl Deref for Lease<'_> {
    type Target = PairBatch;
    fn deref(&self) -> &PairBatch {
        self.batch.as_ref().expect("present until drop")
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.batch.take() {
            let _ = self.free.send(b); // the worker may already have stopped
        }
    }
}

pub struct Loader {
    full: Option<Receiver<Result<PairBatch>>>,
    free: Option<Sender<PairBatch>>,
    worker: Option<JoinHandle<()>>,
}

impl Loader {
    /// Batches of `batch` pairs from split `split` for steps `steps`, `pool` buffers (≥ 2:
    /// one being filled while one is trained on).
    pub fn new(
        data: Arc<DatasetReader>,
        split: &str,
        batch: usize,
        seed: u64,
        steps: Range<u64>,
        pool: usize,
    ) -> Result<Loader> {
        let s = data.split(split)?;
        let mut sampler = PairSampler::new(s.image_texts(), batch, seed);
        if sampler.steps_per_epoch() == 0 {
            return Err(Error::data(format!("the {split} split has fewer paired images than one batch of {batch}")));
        }
        let pool = pool.max(2);
        let (full_tx, full_rx) = sync_channel(pool);
        let (free_tx, free_rx) = channel();
        for _ in 0..pool {
            free_tx.send(PairBatch::default()).expect("receiver alive");
        }
        let split = split.to_string();
        let worker = std::thread::Builder::new()
            .name("semshare-loader".into())
            .spawn(move || fill_loop(&data, &split, &mut sampler, steps, &free_rx, &full_tx))
            .map_err(|e| Error::config(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader { full: Some(full_rx), free: Some(free_tx), worker: Some(worker) })
    }

    /// The next step's batch, in step order; None after the last step or the first error.
    pub fn next_batch(&mut self) -> Option<Result<Lease<'_>>> {
        let got = self.full.as_ref()?.recv().ok()?;
        let free = self.free.as_ref()?;
        Some(got.map(|b| Lease { batch: Some(b), free }))
    }
}

fn fill_loop(
    data: &DatasetReader,
    split: &str,
    sampler: &mut PairSampler,
    steps: Range<u64>,
    free: &Receiver<PairBatch>,
    full: &SyncSender<Result<PairBatch>>,
) {
    let Ok(s) = data.split(split) else { return };
    for step in steps {
        let Ok(mut b) = free.recv() else { return }; // the loader was dropped
        b.step = step;
        sampler.pairs_into(step, &mut b.image_ids, &mut b.text_ids);
        let filled =
            b.images.fill(&data.layout, s, &b.image_ids).and_then(|()| b.texts.fill(&data.layout, s, &b.text_ids));
        let failed = filled.is_err();
        if full.send(filled.map(|()| b)).is_err() || failed {
            return;
        }
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        // Closing both channels wakes the worker wherever it waits.
        drop(self.full.take());
        drop(self.free.take());
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
