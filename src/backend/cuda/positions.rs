//! Values by position in an item (the text side's ψ2 of the position encodings): the
//! encodings' table kept on the device, a table's rows copied to each item's rows, and their
//! sum back (`kernels/rows.cu`).

use super::{Arg, Cuda, blocks, grid_y};
use crate::Result;
use crate::backend::{Segments, check_segment_rows_bwd, check_segment_table};
use crate::tensor::Tensor;

impl Cuda {
    /// Rows 0..rows of the position encodings (`Backend::position_table`), copied from the
    /// table kept on the device, which is uploaded only when more rows or another width are
    /// asked for.
    pub(super) fn kept_positions(&mut self, rows: usize, dim: usize) -> Result<Tensor> {
        let fits = matches!(&self.positions, Some((d, kept, _)) if *d == dim && *kept >= rows);
        if !fits {
            self.check_not_capturing("the position table")?;
            let kept = rows.next_power_of_two().max(64);
            let table = crate::backend::cpu::positions::table(kept, dim);
            let t = crate::backend::Backend::upload(self, &table, &[kept, dim])?;
            self.positions = Some((dim, kept, t));
        }
        let mut out = self.alloc_tensor(&[rows, dim])?;
        let (d, kept, table) = self.positions.take().expect("made above");
        let copied = self.copy_values(table.sub(0, rows * dim), out.view_mut());
        self.positions = Some((d, kept, table));
        copied?;
        Ok(out)
    }

    /// Item b's row t is `table`'s row t (`Backend::segment_rows`).
    pub(super) fn rows_by_position(&mut self, table: &Tensor, seg: &Segments) -> Result<Tensor> {
        check_segment_table(table, seg)?;
        self.per_item("segment_rows", "segment_rows_fwd_f32", table, seg, seg.tokens())
    }

    /// `kernel` run on one row of blocks per item and 128 columns per block (the segment
    /// kernels of `kernels/rows.cu`): arguments `x`, the items' offsets, the item count, the
    /// width, and a new `[rows, x.cols()]` output, which it returns. `op` names the caller in
    /// errors.
    pub(super) fn per_item(
        &mut self,
        op: &'static str,
        kernel: &'static str,
        x: &Tensor,
        seg: &Segments,
        rows: usize,
    ) -> Result<Tensor> {
        let (items, cols) = (seg.items(), x.cols());
        let out = self.alloc_tensor(&[rows, cols])?;
        if items == 0 || cols == 0 {
            return Ok(out);
        }
        let args =
            [Arg::tensor(x)?, Arg::ids(&seg.device)?, Arg::int(op, items)?, Arg::int(op, cols)?, Arg::tensor(&out)?];
        self.launch(kernel, (blocks(cols, 128), grid_y(items), 1), (128, 1, 1), 0, &args)?;
        Ok(out)
    }

    /// Row t sums row t of every item that has one, items in order (`Backend::segment_rows_bwd`).
    pub(super) fn rows_by_position_bwd(&mut self, dy: &Tensor, seg: &Segments, rows: usize) -> Result<Tensor> {
        check_segment_rows_bwd(dy, seg, rows)?;
        let dim = dy.cols();
        let out = self.alloc_tensor(&[rows, dim])?;
        if rows == 0 || dim == 0 {
            return Ok(out);
        }
        let args = [
            Arg::tensor(dy)?,
            Arg::ids(&seg.device)?,
            Arg::int("segment_rows_bwd", seg.items())?,
            Arg::int("segment_rows_bwd", rows)?,
            Arg::int("segment_rows_bwd", dim)?,
            Arg::tensor(&out)?,
        ];
        self.launch("segment_rows_bwd_f32", (blocks(dim, 128), grid_y(rows), 1), (128, 1, 1), 0, &args)?;
        Ok(out)
    }
}
