//! Smoke run of `examples/loadgen.rs`: every scenario of issue 7 in a tiny
//! version against the real `tokenbroker` binary, as part of
//! `cargo test --all-targets`. It prints figures and asserts no timing; the
//! full runs are described in `BENCHMARKS.md`.

#[path = "../examples/loadgen.rs"]
mod loadgen;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The baseline server is this binary re-executed (`serve-baseline`).
    if args.first().map(String::as_str) == Some("serve-baseline") {
        loadgen::entry(args, None);
        return;
    }
    loadgen::entry(
        vec!["smoke".into()],
        Some(env!("CARGO_BIN_EXE_tokenbroker")),
    );
}
