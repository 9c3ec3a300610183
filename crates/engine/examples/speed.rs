//! Quick throughput probe of the CPU backend (the real benchmark is `cargo xtask bench train`).
fn main() {
    let config = engine::Preset::Small.config(8192);
    let params = match std::env::var("INIT") {
        Ok(path) => {
            engine::checkpoint::load(std::path::Path::new(&path))
                .expect("checkpoint")
                .params
        }
        Err(_) => engine::init_params(&config, 1).expect("init"),
    };
    let threads = std::env::var("THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let mut backend = engine::cpu::CpuBackend::new(config, params, threads).expect("backend");
    use engine::Backend;
    let (b, t) = (16, 128);
    let tokens: Vec<u32> = (0..b * t + 1).map(|i| ((i * 7919) % 8192) as u32).collect();
    let batch = engine::train::OwnedBatch {
        inputs: tokens[..b * t].to_vec(),
        targets: tokens[1..].to_vec(),
        batch: b,
        seq: t,
    };
    let opt = engine::OptimizerConfig::default();
    for _ in 0..2 {
        backend
            .train_step(&batch.as_batch(), &opt, 1e-3)
            .expect("step");
    }
    let steps = 10;
    let start = std::time::Instant::now();
    for _ in 0..steps {
        let s = backend
            .train_step(&batch.as_batch(), &opt, 1e-3)
            .expect("step");
        eprintln!("loss {}", s.loss);
    }
    let secs = start.elapsed().as_secs_f64();
    println!("{:.0} tokens/s", (steps * b * t) as f64 / secs);
}
