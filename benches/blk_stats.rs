//! What the blk worker's per-request statistics cost (benches/RESULTS.md, "Daemon").
//!
//! The blk handler counts every request (`BlkHandler::handle`) in relaxed atomics shared with
//! whoever reads them: `in_flight_per_request` is what is always counted now (the in-flight
//! gauge up and down, the request counter), `histogram_per_request` adds what
//! `--latency-histogram` asks for: one `Instant::now()` (a request starts when the one before
//! it in the batch completed), a latency bucket and the latency sum. Each iteration is a batch
//! of 32 (criterion's throughput is per request);
//! `pread_4k` is the cheapest real request for comparison: one 4 KiB `pread` from a memfd in the
//! page cache (what a 4 KiB read of an in-memory disk costs the worker in a syscall), and
//! `clock_read` the clock read alone (32 per iteration).

use std::hint::black_box;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BUCKETS: usize = 24;
const BATCH: u64 = 32;

struct Counters {
    in_flight: AtomicU64,
    requests: AtomicU64,
    latency: [AtomicU64; BUCKETS],
    latency_sum: AtomicU64,
}

fn bucket(nanos: u64) -> usize {
    let micros = nanos / 1000;
    ((u64::BITS - micros.leading_zeros()) as usize).min(BUCKETS - 1)
}

fn bench(c: &mut Criterion) {
    let counters = Arc::new(Counters {
        in_flight: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        latency: std::array::from_fn(|_| AtomicU64::new(0)),
        latency_sum: AtomicU64::new(0),
    });
    let mut group = c.benchmark_group("blk_stats");
    group.throughput(Throughput::Elements(BATCH));
    // Always on: the in-flight gauge (new) and the request counter (as before).
    group.bench_function("in_flight_per_request", |b| {
        b.iter(|| {
            let c = &*counters;
            for _ in 0..BATCH {
                c.in_flight.fetch_add(1, Ordering::Relaxed);
                black_box(&c.in_flight);
                c.in_flight.fetch_sub(1, Ordering::Relaxed);
                c.requests.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    // --latency-histogram: the same plus one clock read, a bucket and the sum.
    group.bench_function("histogram_per_request", |b| {
        b.iter(|| {
            let c = &*counters;
            let mut clock = None;
            for _ in 0..BATCH {
                let started = clock.take().unwrap_or_else(Instant::now);
                c.in_flight.fetch_add(1, Ordering::Relaxed);
                let now = Instant::now();
                clock = Some(now);
                let nanos = u64::try_from(now.duration_since(started).as_nanos()).unwrap_or(0);
                c.latency[bucket(black_box(nanos))].fetch_add(1, Ordering::Relaxed);
                c.latency_sum.fetch_add(nanos, Ordering::Relaxed);
                c.in_flight.fetch_sub(1, Ordering::Relaxed);
                c.requests.fetch_add(1, Ordering::Relaxed);
            }
        })
    });
    group.bench_function("clock_read", |b| {
        b.iter(|| {
            for _ in 0..BATCH {
                black_box(Instant::now());
            }
        })
    });
    group.finish();
    let file = vvu_core::memory::create_memfd("bench", 1 << 20).expect("memfd");
    let data = vec![0x5au8; 1 << 20];
    // SAFETY: writing from a live buffer of the given length to an open fd.
    let n = unsafe { libc::pwrite(file.as_raw_fd(), data.as_ptr().cast(), data.len(), 0) };
    assert_eq!(
        n,
        data.len() as isize,
        "the page cache holds the data: no holes"
    );
    let mut buf = vec![0u8; 4096];
    c.bench_function("blk_stats/pread_4k", |b| {
        b.iter(|| {
            // SAFETY: reading into a live buffer of the given length from an open fd.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    black_box(8192),
                )
            };
            assert_eq!(n, 4096);
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
