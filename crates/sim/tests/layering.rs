//! The layering the architecture states: the run's decisions (`run`), the process that
//! holds a run (`runner`) and the simulator drive no HTTP, so none of them may depend on
//! an HTTP crate, server or client, whatever features the workspace turns on elsewhere.

use std::process::Command;

/// Crates that speak HTTP (servers, clients and their plumbing).
const HTTP_CRATES: &[&str] = &["axum", "hyper", "hyper-util", "reqwest", "tower-http", "h2"];

/// The normal (non-dev) dependencies of `package`, by name.
fn dependencies(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "tree",
            "--offline",
            "-e",
            "normal",
            "--prefix",
            "none",
            "-p",
            package,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(
        out.status.success(),
        "cargo tree -p {package}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect()
}

fn check(package: &str) {
    let deps = dependencies(package);
    assert!(
        deps.iter().any(|d| d == package),
        "cargo tree did not list {package} itself: {deps:?}"
    );
    let http: Vec<&String> = deps
        .iter()
        .filter(|d| HTTP_CRATES.contains(&d.as_str()))
        .collect();
    assert!(http.is_empty(), "{package} depends on HTTP crates {http:?}");
}

#[test]
fn the_run_the_runner_and_the_simulator_depend_on_no_http_crate() {
    for package in [
        "run",
        "runner",
        "sim",
        "scheduler",
        "validation",
        "agree",
        "peer",
    ] {
        check(package);
    }
    // The check can fail: the coordinator, the HTTP driver, does depend on them.
    let coordinator = dependencies("coordinator");
    assert!(coordinator.iter().any(|d| d == "axum"), "{coordinator:?}");
}
