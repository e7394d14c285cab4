//! Shared by the hostile and differential tests: a bug that lets a hostile ring allocate or spin
//! without end fails the test instead of taking the machine with it (a loosened region bound
//! once grew these tests to ~22 GB until the OOM killer ended them).

use std::sync::Once;

/// Address space of the test process: far above what the tests need (a few MiB of guest memory
/// and segment lists), far below the machine's memory. An allocation beyond it fails (the
/// queue's `try_reserve` reports it; anything else aborts the test process).
pub const ADDRESS_SPACE: u64 = 2 << 30;
/// CPU seconds of the test process (the whole binary under `cargo test`, one test under
/// nextest): SIGXCPU ends a test that spins.
pub const CPU_SECONDS: u64 = 600;

/// Apply the bounds to this process, once; call it before the test builds any ring.
pub fn bound_resources() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for (resource, limit) in [
            (libc::RLIMIT_AS, ADDRESS_SPACE),
            (libc::RLIMIT_CPU, CPU_SECONDS),
        ] {
            let rlim = libc::rlimit {
                rlim_cur: limit,
                rlim_max: limit,
            };
            // SAFETY: setrlimit reads the struct we pass; lowering our own limits needs no
            // privilege.
            let rc = unsafe { libc::setrlimit(resource, &rlim) };
            assert_eq!(rc, 0, "setrlimit: {}", std::io::Error::last_os_error());
        }
    });
}

/// Cases per property/fuzz test: `default` (what CI runs), or `VVU_FUZZ_CASES` when set, for
/// longer runs on demand (docs/reliability.md, "Fuzzing").
#[allow(dead_code)] // not every test file that shares this module has property tests
pub fn cases(default: u32) -> u32 {
    std::env::var("VVU_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
