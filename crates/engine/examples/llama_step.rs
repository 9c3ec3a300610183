//! Seconds per training step and peak memory of a Llama at SmolLM2-135M's shape with
//! random weights, counted by the allocator:
//! `cargo run --release -p engine --example llama_step -- [threads] [batch] [seq] [steps] [lora]`;
//! `lora` trains a LoRA adapter (rank 16, alpha 32, all seven projections) on a frozen
//! base instead of every weight.

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
    let threads: usize = arg(0, "2").parse()?;
    let (b, t): (usize, usize) = (arg(1, "1").parse()?, arg(2, "128").parse()?);
    let steps: usize = arg(3, "3").parse()?;
    let config = engine::LlamaConfig::smollm2_135m(t);
    let spec = match arg(4, "full").as_str() {
        "lora" => engine::ModelSpec::llama_lora(
            "smollm2-135m-shape-lora",
            config,
            engine::LoraConfig {
                rank: 16,
                alpha: 32.0,
                targets: engine::LoraTarget::ALL.to_vec(),
            },
        ),
        _ => engine::ModelSpec::llama("smollm2-135m-shape", config),
    };
    let vocab = config.vocab_size;
    let tokens: Vec<u32> = (0..b * t + 1).map(|i| (i * 7919 % vocab) as u32).collect();
    let batch = engine::Batch {
        inputs: &tokens[..b * t],
        targets: &tokens[1..],
        batch: b,
        seq: t,
    };
    let params = spec.init_params(1)?;
    let mut backend = engine::open_model(
        &format!("cpu:{threads}"),
        &spec,
        params,
        engine::Purpose::Train,
    )?;
    let opened = LIVE.load(Ordering::Relaxed);
    println!(
        "{} parameters, {b}x{t} tokens, {} ; opened {:.1} MB",
        spec.n_params(),
        backend.device(),
        opened as f64 / 1e6
    );
    let opt = engine::OptimizerConfig::default();
    let mut times = Vec::new();
    for step in 0..steps {
        let start = std::time::Instant::now();
        let stats = backend.train_step(&batch, &opt, 1e-4)?;
        let secs = start.elapsed().as_secs_f64();
        times.push(secs);
        println!(
            "step {step}: {secs:.3} s, loss {:.4}, grad norm {:.4}",
            stats.loss, stats.grad_norm
        );
    }
    // The first step allocates the activations; later steps show the steady rate.
    let steady = &times[1.min(times.len() - 1)..];
    let mean = steady.iter().sum::<f64>() / steady.len() as f64;
    println!(
        "steady {mean:.3} s/step ({:.0} tokens/s), peak {:.1} MB allocated",
        (b * t) as f64 / mean,
        PEAK.load(Ordering::Relaxed) as f64 / 1e6
    );
    Ok(())
}
