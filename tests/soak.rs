//! The soak-and-chaos run of `examples/soak` in its short configuration,
//! under `cargo test`: every fault kind once against one broker on SQLite
//! (about 80 s), then a short HA section (three replicas on PostgreSQL,
//! SIGKILL of a replica, a simulated database restart, IdP 500s; about
//! 45 s). It prints the soak's table and fails when an invariant broke; the
//! long runs and their figures are in the README ("Soak").
//!
//! Runs without the libtest harness (`harness = false`) so that the table is
//! printed as it comes; `--list` and name filters behave like libtest's.
//! The HA section needs PostgreSQL: `TB_TEST_PG_URL`, as `./scripts/test`
//! provides (`scripts/pg-for-tests`). `SOAK_SEED` fixes the seed (it is
//! printed either way).

#[path = "../examples/soak/main.rs"]
mod soak;

/// Flags of libtest that take a value (the value is not a filter).
const VALUED: &[&str] = &[
    "--test-threads",
    "--skip",
    "--color",
    "--format",
    "--logfile",
    "-Z",
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        println!("soak: test");
        return;
    }
    let mut filters = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if VALUED.contains(&args[i].as_str()) {
            i += 2;
            continue;
        }
        if !args[i].starts_with('-') {
            filters.push(args[i].clone());
        }
        i += 1;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let selected = filters.is_empty()
        || filters.iter().any(|f| {
            if exact {
                f == "soak"
            } else {
                "soak".contains(f.as_str())
            }
        });
    if !selected || args.iter().any(|a| a == "--ignored") {
        println!(
            "\nrunning 0 tests\n\ntest result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 1 filtered out\n"
        );
        return;
    }
    println!("\nrunning 1 test");
    let seed =
        std::env::var("SOAK_SEED").unwrap_or_else(|_| (rand::random::<u32>() as u64).to_string());
    let bin = env!("CARGO_BIN_EXE_tokenbroker");
    let run = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "--schedule",
            "short",
            "--duration",
            "0",
            "--access-lifetime",
            "10",
            "--seed",
            &seed,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        soak::entry(args, Some(bin))
    };
    let single = run(&[
        "--mode",
        "single",
        "--sessions",
        "2000",
        "--rate",
        "150",
        "--watchers",
        "150",
        "--budget",
        "250",
    ]);
    let ha = run(&[
        "--mode",
        "ha",
        "--sessions",
        "1000",
        "--rate",
        "100",
        "--watchers",
        "90",
        "--budget",
        "240",
    ]);
    let ok = single == 0 && ha == 0;
    println!(
        "test soak ... {}\n\ntest result: {}. {} passed; {} failed; 0 ignored; 0 measured; 0 filtered out\n",
        if ok { "ok" } else { "FAILED" },
        if ok { "ok" } else { "FAILED" },
        u8::from(ok),
        u8::from(!ok)
    );
    if !ok {
        eprintln!(
            "soak: single mode exited {single}, HA mode exited {ha} (seed {seed}; SOAK_SEED={seed} repeats the choices)"
        );
        std::process::exit(1);
    }
}
