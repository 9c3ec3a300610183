//! Bytes a training and an evaluation backend hold at a preset, counted by the allocator:
//! `cargo run --release -p engine --example memory -- base 8192 4 1024`; next to each, the
//! bytes `engine::backend_bytes` states without opening one.

// A global allocator is the one way to count what a backend allocates.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to `System` with the same layout; the counters only
// add and subtract the sizes it was asked for.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as is.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or(default.into());
    let preset = engine::Preset::from_name(&arg(0, "base")).ok_or("unknown preset")?;
    let vocab: usize = arg(1, "8192").parse()?;
    let (b, t): (usize, usize) = (arg(2, "4").parse()?, arg(3, "1024").parse()?);
    let spec = engine::ModelSpec::preset(preset, vocab);
    let params = spec.init_params(1)?;
    let tokens: Vec<u32> = (0..b * t + 1).map(|i| (i * 7919 % vocab) as u32).collect();
    let batch = engine::Batch {
        inputs: &tokens[..b * t],
        targets: &tokens[1..],
        batch: b,
        seq: t,
    };
    println!(
        "{} preset, vocab {vocab}, {} parameters, one {b}x{t} forward",
        preset.name(),
        spec.n_params()
    );
    for purpose in [engine::Purpose::Train, engine::Purpose::Eval] {
        let before = LIVE.load(Ordering::Relaxed);
        let mut backend = engine::open_model("cpu:2", &spec, params.clone(), purpose)?;
        let opened = LIVE.load(Ordering::Relaxed) - before;
        let loss = backend.eval_loss(&batch)?;
        let after = LIVE.load(Ordering::Relaxed) - before;
        let stated = engine::backend_bytes(&spec, purpose, b, t);
        println!(
            "{purpose:?}: {:.1} MB opened (parameters included), {:.1} MB after the forward (engine::backend_bytes states {:.1} MB), loss {loss}",
            opened as f64 / 1e6,
            after as f64 / 1e6,
            stated as f64 / 1e6
        );
        drop(backend);
    }
    Ok(())
}
