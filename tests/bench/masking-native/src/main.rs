//! Native masking throughput: masks each request body given on the command
//! line (`CASE=PATH`) with the masking configuration in the first argument
//! (a JSON `masking` object), repeatedly for about `BENCH_SECONDS` (default 2),
//! and prints one line per case for tests/bench:
//! `BENCH_MASK {"case": "...", "bytes": N, "seconds": S, "iterations": I}`.

use std::time::{Duration, Instant};

use countersign_core::mask::{mask_request, MaskingConfig};
use countersign_core::wire::ApiKind;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((config, cases)) = args.split_first() else {
        eprintln!("usage: countersign-bench-masking MASKING_JSON CASE=BODY_FILE...");
        std::process::exit(2);
    };
    let masking = match MaskingConfig::from_json(config.as_bytes()) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("masking configuration: {e}");
            std::process::exit(2);
        }
    };
    let Some(policy) = masking.default_profile() else {
        eprintln!("masking configuration has no default profile");
        std::process::exit(2);
    };
    let budget = Duration::from_secs_f64(
        std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(2.0),
    );
    for case in cases {
        let Some((name, path)) = case.split_once('=') else {
            eprintln!("expected CASE=PATH, got {case}");
            std::process::exit(2);
        };
        let body = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        };
        // Warm up, and check that it works at all.
        let changed = match mask_request(policy, ApiKind::OpenaiChat, &body) {
            Ok(r) => r.body.is_some(),
            Err(e) => {
                eprintln!("{name}: masking failed: {e:?}");
                std::process::exit(1);
            }
        };
        let start = Instant::now();
        let mut iterations: u64 = 0;
        while start.elapsed() < budget {
            for _ in 0..16 {
                let r = mask_request(policy, ApiKind::OpenaiChat, std::hint::black_box(&body));
                std::hint::black_box(&r);
                iterations += 1;
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "BENCH_MASK {{\"case\": \"{name}\", \"bytes\": {}, \"seconds\": {seconds:.6}, \"iterations\": {iterations}, \"changed\": {changed}}}",
            body.len() as u64 * iterations
        );
    }
}
