//! The emulated device's own checks (`SEMSHARE_GPU=emulated`): kernels with a planted bug
//! (`tests/kernels/broken.cu`) must fail with a message naming the kernel, the block, the thread
//! and what went wrong; the same kernels without the bug must pass; a partial warp behaves as
//! on the hardware. On a real GPU (or with no device) these tests print a skip line: they test
//! the emulator, not the GPU.
#![cfg(feature = "cuda")]

use std::ffi::c_void;
use std::sync::Mutex;

use cudarc::driver::{CudaContext, DriverError, result, sys};

static PTX: &str = concat!(include_str!(concat!(env!("OUT_DIR"), "/broken.ptx")), "\0");

/// A fault leaves the context failed (as on a GPU) until the last user releases it: the tests
/// of this file take turns.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Device {
    _ctx: std::sync::Arc<CudaContext>,
    module: sys::CUmodule,
}

fn device(test: &str) -> Option<Device> {
    if !semshare::backend::cuda::emulated() {
        eprintln!("SKIP {test}: tests the emulated device (SEMSHARE_GPU=emulated)");
        return None;
    }
    assert!(semshare::backend::cuda::available(), "{test}: the emulated device did not load");
    let ctx = CudaContext::new(0).expect("open the emulated device");
    ctx.bind_to_thread().expect("bind");
    // SAFETY: PTX text with a terminating NUL, alive for the program.
    let module = unsafe { result::module::load_data(PTX.as_ptr() as *const c_void) }.expect("load broken.ptx");
    Some(Device { _ctx: ctx, module })
}

fn upload(v: &[f32]) -> u64 {
    // SAFETY: a fresh allocation of exactly v.len() floats, then a copy of as many.
    unsafe {
        let p = result::malloc_sync(v.len() * 4).expect("alloc");
        result::memcpy_htod_sync(p, v).expect("upload");
        p
    }
}

fn download(p: u64, n: usize) -> Vec<f32> {
    let mut v = vec![0f32; n];
    // SAFETY: p holds at least n floats.
    unsafe { result::memcpy_dtoh_sync(&mut v, p) }.expect("download");
    v
}

/// Launches `name` with pointer and int arguments; the driver's error, if any, as text.
fn launch(d: &Device, name: &str, grid: u32, block: u32, args: &[u64]) -> Result<(), String> {
    launch_as(d, name, grid, block, args, false)
}

/// As `launch`, cooperatively (every block resident at once).
fn launch_cooperative(d: &Device, name: &str, grid: u32, block: u32, args: &[u64]) -> Result<(), String> {
    launch_as(d, name, grid, block, args, true)
}

fn launch_as(d: &Device, name: &str, grid: u32, block: u32, args: &[u64], cooperative: bool) -> Result<(), String> {
    let cname = std::ffi::CString::new(name).expect("name");
    let (grid, block) = ((grid, 1, 1), (block, 1, 1));
    // SAFETY: the module is loaded; `args` match each kernel's signature (pointers and ints as
    // 8-byte slots, read at their declared size).
    unsafe {
        let f = result::module::get_function(d.module, cname).map_err(text)?;
        let mut slots: Vec<u64> = args.to_vec();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        let stream = std::ptr::null_mut();
        if cooperative {
            result::launch_cooperative_kernel(f, grid, block, 0, stream, &mut params).map_err(text)?;
        } else {
            result::launch_kernel(f, grid, block, 0, stream, &mut params).map_err(text)?;
        }
        result::ctx::synchronize().map_err(text)
    }
}

#[test]
fn a_cooperative_grid_meets_at_its_barrier_and_one_too_large_is_refused() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("cooperative launch") else { return };
    // 128 blocks (one per host thread) meet at the barrier twice over: two launches reuse the
    // words, which each barrier leaves at count zero.
    let blocks = 128;
    let input: Vec<f32> = (0..blocks).map(|i| i as f32).collect();
    let (x, stage, y, bar) =
        (upload(&input), upload(&vec![0.0; blocks]), upload(&vec![0.0; blocks]), upload(&[0.0; 2]));
    for round in 0..2 {
        launch_cooperative(&d, "grid_rotate", blocks as u32, 64, &[x, stage, y, bar]).expect("a resident grid runs");
        let want: Vec<f32> = (0..blocks).map(|i| 2.0 * ((i + 1) % blocks) as f32).collect();
        assert_eq!(download(y, blocks), want, "round {round}");
        assert_eq!(download(bar, 1)[0].to_bits(), 0, "round {round}: the arrival count is reset");
    }
    // 1024-thread blocks: 2 fit on each of 132 multiprocessors, so 265 cannot all be resident.
    let e = launch_cooperative(&d, "grid_rotate", 265, 1024, &[x, stage, y, bar]).unwrap_err();
    assert!(e.contains("COOPERATIVE_LAUNCH_TOO_LARGE") && e.contains("grid_rotate") && e.contains("265 blocks"), "{e}");
}

fn text(e: DriverError) -> String {
    let s = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    format!("{:?}: {s}", e.0)
}

#[test]
fn a_missing_barrier_is_a_race_naming_both_threads() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("missing_barrier") else { return };
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let (x, y) = (upload(&input), upload(&vec![0.0; 64]));
    launch(&d, "with_barrier", 1, 64, &[x, y]).expect("the kernel with its barrier passes");
    let want: Vec<f32> = (0..64).map(|i| ((i + 1) % 64) as f32).collect();
    assert_eq!(download(y, 64), want);

    let e = launch(&d, "missing_barrier", 1, 64, &[x, y]).expect_err("a missing barrier must fail");
    for part in
        ["CUDA_ERROR_LAUNCH_FAILED", "kernel `missing_barrier`", "block (0,0,0)", "thread (", "race", "__syncthreads"]
    {
        assert!(e.contains(part), "missing `{part}` in: {e}");
    }
}

/// A warp's readers of a shared word, then a write by one of its lanes after `__syncwarp`:
/// ordered, as on the hardware. The same write from another warp: a race naming the readers'
/// warp.
#[test]
fn a_warps_readers_are_ordered_by_its_warp_barrier_and_no_other_warps() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("warp_readers_then_writer") else { return };
    let y = upload(&[0.0; 64]);
    launch(&d, "warp_readers_then_writer", 1, 64, &[y, 0])
        .expect("a lane of the readers' warp writes after its barrier");
    let want: Vec<f32> = (0..64).map(|t| if t < 32 { 1.0 } else { 0.0 }).collect();
    assert_eq!(download(y, 64), want);
    let e = launch(&d, "warp_readers_then_writer", 1, 64, &[y, 1]).expect_err("another warp's write must fail");
    for part in ["kernel `warp_readers_then_writer`", "race", "several threads of warp 0", "__syncthreads"] {
        assert!(e.contains(part), "missing `{part}` in: {e}");
    }
}

#[test]
fn an_index_one_past_the_end_names_kernel_thread_and_index() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("one_past_the_end") else { return };
    let y = upload(&vec![0.0; 64]);
    let e = launch(&d, "one_past_the_end", 2, 64, &[y, 64]).expect_err("one past the end must fail");
    // Thread 0 of block 1 is element 64 of 64.
    for part in [
        "CUDA_ERROR_ILLEGAL_ADDRESS",
        "kernel `one_past_the_end`",
        "block (1,0,0) thread (0,0,0)",
        "global store",
        "element 64 of 64",
    ] {
        assert!(e.contains(part), "missing `{part}` in: {e}");
    }
    // As on a GPU, the context stays failed: the next call reports the fault too.
    let again = launch(&d, "one_past_the_end", 1, 32, &[y, 16]).expect_err("sticky");
    assert!(again.contains("ILLEGAL_ADDRESS"), "{again}");
}

#[test]
fn a_shared_index_one_past_the_end_names_the_shared_size() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("shared_one_past_the_end") else { return };
    let (x, y) = (upload(&[1.0; 32]), upload(&[0.0; 32]));
    let e = launch(&d, "shared_one_past_the_end", 1, 32, &[x, y]).expect_err("must fail");
    for part in [
        "kernel `shared_one_past_the_end`",
        "thread (31,0,0)",
        "shared store",
        "offset 128",
        "128 bytes of shared memory",
    ] {
        assert!(e.contains(part), "missing `{part}` in: {e}");
    }
}

#[test]
fn a_partial_warp_reads_poison_from_lanes_that_do_not_exist() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("warp_sum") else { return };
    let x = upload(&vec![1.0; 64]);
    let y = upload(&vec![0.0; 64]);
    // Two full warps: every lane sums 32 ones.
    launch(&d, "warp_sum", 1, 64, &[x, y]).expect("full warps");
    assert!(download(y, 64).iter().all(|&v| v == 32.0));
    // 48 threads: warp 1 has 16 lanes; a full-mask shuffle from a missing lane is undefined on
    // the GPU and NaN here, so the kernel's assumption shows up as NaN in its output.
    launch(&d, "warp_sum", 1, 48, &[x, y]).expect("a partial warp is legal");
    let out = download(y, 48);
    assert!(out[..32].iter().all(|&v| v == 32.0), "the full warp is unaffected: {:?}", &out[..32]);
    assert!(out[32..].iter().all(|v| v.is_nan()), "the partial warp must see poison: {:?}", &out[32..]);
}

#[test]
fn launch_limits_are_the_hardwares() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("launch_limits") else { return };
    let y = upload(&vec![0.0; 64]);
    let e = launch(&d, "one_past_the_end", 1, 2048, &[y, 0]).expect_err("2048 threads per block");
    assert!(e.contains("INVALID_VALUE") && e.contains("1024 threads"), "{e}");
    let cname = std::ffi::CString::new("one_past_the_end").expect("name");
    // SAFETY: as in `launch`; the launch is refused before any argument is read.
    let e = unsafe {
        let f = result::module::get_function(d.module, cname).expect("function");
        let mut slots = [y, 0u64];
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        result::launch_kernel(f, (1, 70_000, 1), (32, 1, 1), 0, std::ptr::null_mut(), &mut params)
    }
    .map_err(text)
    .expect_err("grid y over 65535");
    assert!(e.contains("65535"), "{e}");
}

#[test]
fn bit_field_instructions_match_their_definition() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("bit_fields") else { return };
    let input: Vec<u32> = (0..64u32).map(|i| i.wrapping_mul(0x9E37_79B9) ^ 0x8000_0001).collect();
    let x = upload(&input.iter().map(|&v| f32::from_bits(v)).collect::<Vec<_>>());
    let y = upload(&[0.0; 5 * 64]);
    launch(&d, "bit_fields", 1, 64, &[x, y]).expect("bit_fields");
    let got: Vec<u32> = download(y, 5 * 64).iter().map(|v| v.to_bits()).collect();
    for (t, &v) in input.iter().enumerate() {
        let (p, n) = (t as u32 % 29, 1 + t as u32 % 7);
        let field = (v >> p) & ((1 << n) - 1);
        let signed = if field >> (n - 1) & 1 == 1 { field | !((1 << n) - 1) } else { field };
        let mask = ((1u32 << n) - 1) << p;
        let insert = (0xA5A5_A5A5 & !mask) | ((v << p) & mask);
        assert_eq!(&got[5 * t..5 * t + 5], &[field, signed, insert, v, 0], "thread {t}");
    }
}

#[test]
fn lop3_shf_prmt_bfind_match_their_definition() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("bit_ops") else { return };
    let input: Vec<u32> = (0..64u32).map(|i| i.wrapping_mul(0x85EB_CA6B).rotate_left(i) ^ 0x0F0F_8001).collect();
    let x = upload(&input.iter().map(|&v| f32::from_bits(v)).collect::<Vec<_>>());
    let y = upload(&[0.0; 6 * 64]);
    launch(&d, "bit_ops", 1, 64, &[x, y]).expect("bit_ops");
    let got: Vec<u32> = download(y, 6 * 64).iter().map(|v| v.to_bits()).collect();
    for t in 0..64 {
        let (a, b, n) = (input[t], input[(t + 1) % 64], t as u32 % 40);
        let majority = (a & b) | (a & n) | (b & n);
        let wide = ((b as u64) << 32) | a as u64;
        let left = ((wide << (n & 31)) >> 32) as u32;
        let right = (wide >> (n & 31)) as u32;
        let clamped = (wide >> n.min(32)) as u32;
        // Selector 0x9E40, nibbles from the low end: byte 0 of a, byte 4 (b's lowest), byte 6
        // sign-extended (nibble 0xE: byte 6 with bit 3 set), byte 1 sign-extended (nibble 9).
        let byte = |i: u32| ((wide >> (8 * i)) & 0xff) as u32;
        let sign = |i: u32| if byte(i) & 0x80 != 0 { 0xff } else { 0 };
        let permuted = byte(0) | byte(4) << 8 | sign(6) << 16 | sign(1) << 24;
        let v = a >> (n % 32);
        let msb = if v == 0 { u32::MAX } else { 31 - v.leading_zeros() };
        assert_eq!(&got[6 * t..6 * t + 6], &[majority, left, right, clamped, permuted, msb], "thread {t}");
    }
}

/// Launches `name` (pointer arguments, one block) on `stream` without waiting.
fn launch_on(d: &Device, stream: sys::CUstream, name: &str, block: u32, args: &[u64]) -> Result<(), String> {
    let cname = std::ffi::CString::new(name).expect("name");
    // SAFETY: as in `launch_as`.
    unsafe {
        let f = result::module::get_function(d.module, cname).map_err(text)?;
        let mut slots: Vec<u64> = args.to_vec();
        let mut params: Vec<*mut c_void> = slots.iter_mut().map(|s| s as *mut u64 as *mut c_void).collect();
        result::launch_kernel(f, (1, 1, 1), (block, 1, 1), 0, stream, &mut params).map_err(text)
    }
}

#[test]
fn a_captured_stream_records_and_a_graph_replays_on_the_inputs_of_the_moment() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("graph capture") else { return };
    let n = 64;
    let (x, y, z) = (upload(&vec![0.0; n]), upload(&vec![0.0; n]), upload(&vec![0.0; n]));
    // SAFETY: a stream of this context; every pointer is a live allocation of n floats.
    unsafe {
        let s = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
        result::stream::begin_capture(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED).expect("begin");
        // Recorded, not run: y keeps its zeros until the graph is launched.
        launch_on(&d, s, "with_barrier", n as u32, &[x, y]).expect("captured launch");
        result::memcpy_dtod_async(z, y, n * 4, s).expect("captured copy");
        result::memset_d8_async(x, 0, n * 4, s).expect("captured memset");
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        sys::cuStreamIsCapturing(s, &mut status).result().expect("status");
        assert_eq!(status, sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE);
        let graph = result::stream::end_capture(s).expect("end");
        assert!(download(z, n).iter().all(|&v| v == 0.0), "capturing ran the work");
        let exec = result::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0)).expect("instantiate");
        // Each replay reads x as it is then: new inputs between launches, no new capture.
        for round in 0..3 {
            let input: Vec<f32> = (0..n).map(|i| (i * 10 + round) as f32).collect();
            result::memcpy_htod_sync(x, &input).expect("new input");
            result::graph::launch(exec, s).expect("replay");
            result::stream::synchronize(s).expect("sync");
            let want: Vec<f32> = (0..n).map(|i| input[(i + 1) % n]).collect();
            assert_eq!(download(z, n), want, "round {round}");
            assert!(download(x, n).iter().all(|&v| v == 0.0), "round {round}: the memset node ran");
        }
        result::graph::exec_destroy(exec).expect("destroy exec");
        result::graph::destroy(graph).expect("destroy graph");
        result::stream::destroy(s).expect("stream");
    }
}

#[test]
fn what_a_capture_cannot_hold_is_refused_and_invalidates_it() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("graph capture refusals") else { return };
    let n = 32;
    let x = upload(&vec![1.0; n]);
    let host = vec![2.0f32; n];
    type Refused = fn(sys::CUstream, u64, &[f32]) -> Result<(), DriverError>;
    let cases: [(&str, Refused); 3] = [
        ("cuStreamSynchronize", |s, _, _| unsafe { result::stream::synchronize(s) }),
        ("cuMemcpyHtoDAsync", |s, x, h| unsafe { result::memcpy_htod_async(x, h, s) }),
        ("cuMemAlloc", |_, _, _| unsafe { result::malloc_sync(256).map(|_| ()) }),
    ];
    for (what, call) in cases {
        // SAFETY: a stream of this context; x holds n floats.
        unsafe {
            let s = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
            result::stream::begin_capture(s, sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL).expect("begin");
            launch_on(&d, s, "with_barrier", n as u32, &[x, x]).expect("captured launch");
            let e = text(call(s, x, &host).unwrap_err());
            assert!(e.contains("CAPTURE_UNSUPPORTED") && e.contains(what), "{what}: {e}");
            let e = text(result::stream::end_capture(s).unwrap_err());
            assert!(e.contains("INVALIDATED") && e.contains(what), "{what}: {e}");
            result::stream::destroy(s).expect("stream");
        }
    }
    // Outside a capture the same calls work again.
    unsafe { result::memcpy_htod_sync(x, &host) }.expect("upload after the captures");
    assert_eq!(download(x, n), host);
}

/// Two streams run apart on the emulated device as on a GPU: a copy to the device waits on its
/// stream until an event wait (or the host) orders it, and work on another stream that touches
/// its memory before that is a race, named with both sides. Ordered by an event, the same
/// copy arrives before the work that reads it; a wait by the copy's own stream orders nothing.
/// Pageable host memory is read when the copy is queued (the driver stages it).
#[test]
fn a_copy_on_another_stream_is_ordered_only_by_an_event_wait() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("streams") else { return };
    let n = 64;
    let (x, y) = (upload(&vec![0.0; n]), upload(&vec![0.0; n]));
    let values: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
    // SAFETY: streams and an event of this context; x and y hold n floats; `values` outlives
    // every copy out of it (each is run before the test reads or drops anything).
    unsafe {
        let copies = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
        let compute = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
        let arrived = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING).expect("event");
        // Ordered: the copy arrives, then y = x on the compute stream. The pageable source may
        // be reused as soon as the copy is queued.
        let mut pageable = values.clone();
        result::memcpy_htod_async(x, &pageable, copies).expect("queue the upload");
        pageable.fill(-1.0);
        result::event::record(arrived, copies).expect("record");
        result::stream::wait_event(compute, arrived, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).expect("wait");
        result::memcpy_dtod_async(y, x, n * 4, compute).expect("queue the move");
        result::stream::synchronize(compute).expect("sync");
        assert_eq!(download(y, n), values, "the ordered copy arrived first");
        // Not ordered (the copy stream waits for its own event, not the compute stream): a
        // kernel on the compute stream reads x while a copy into it waits on the other stream.
        result::memcpy_htod_async(x, &values, copies).expect("queue the upload");
        result::event::record(arrived, copies).expect("record");
        result::stream::wait_event(copies, arrived, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT).expect("wait");
        let e = launch_on(&d, compute, "with_barrier", n as u32, &[x, y]).unwrap_err();
        assert!(e.contains("race between streams") && e.contains("cuMemcpyHtoDAsync") && e.contains("a kernel"), "{e}");
        result::event::destroy(arrived).ok();
        result::stream::destroy(compute).ok();
        result::stream::destroy(copies).ok();
    }
}

/// The other way round: a copy waiting on one stream that reads memory a later kernel on
/// another stream overwrites, with no event between them, is caught when the copy runs.
#[test]
fn a_copy_still_reading_memory_another_stream_overwrites_is_a_race() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("streams, write after read") else { return };
    let n = 64;
    let (x, y) = (upload(&vec![1.0; n]), upload(&vec![0.0; n]));
    // SAFETY: as above.
    unsafe {
        let copies = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
        let compute = result::stream::create(result::stream::StreamKind::NonBlocking).expect("stream");
        result::memcpy_dtod_async(y, x, n * 4, copies).expect("queue a copy out of x");
        let e = launch_on(&d, compute, "with_barrier", n as u32, &[x, x]).unwrap_err();
        assert!(e.contains("race between streams") && e.contains("cuMemcpyDtoDAsync") && e.contains("reads"), "{e}");
        result::stream::destroy(compute).ok();
        result::stream::destroy(copies).ok();
    }
}

/// bf16 bits of small multiples of 1/4 (exact in bf16, and every sum of their products exact
/// in f32), two to a 32-bit word, the first in the low half.
fn bf16_words(v: &[f32]) -> u64 {
    let words: Vec<f32> =
        v.chunks(2).map(|p| f32::from_bits((p[0].to_bits() >> 16) | (p[1].to_bits() & 0xffff_0000))).collect();
    upload(&words)
}

/// The product of one warp's mma, element for element; lane 0 shuffles alone first, and the
/// other 31 lanes wait for it at the mma (routing the warp by lane 0 once let them through
/// without their product); half a warp at an mma is an error.
#[test]
fn mma_computes_a_warps_tile_from_the_fragments_the_ptx_isa_assigns() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(d) = device("mma_tile") else { return };
    let a: Vec<f32> = (0..256).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect();
    let b: Vec<f32> = (0..128).map(|i| ((i * 5 % 11) as f32 - 5.0) / 4.0).collect();
    let c: Vec<f32> = (0..128).map(|i| (i % 9) as f32 - 4.0).collect();
    let (pa, pb, pc, pd) = (bf16_words(&a), bf16_words(&b), upload(&c), upload(&[0.0; 128]));
    launch(&d, "mma_tile", 1, 32, &[pa, pb, pc, pd]).expect("one whole warp");
    let got = download(pd, 128);
    for i in 0..16 {
        for j in 0..8 {
            let want = c[i * 8 + j] + (0..16).map(|k| a[i * 16 + k] * b[k * 8 + j]).sum::<f32>();
            assert_eq!(got[i * 8 + j], want, "D[{i}][{j}]");
        }
    }
    let e = launch(&d, "mma_tile", 1, 16, &[pa, pb, pc, pd]).expect_err("half a warp");
    for part in ["kernel `mma_tile`", "mma.sync needs all 32 lanes of warp 0"] {
        assert!(e.contains(part), "missing `{part}` in: {e}");
    }
}
