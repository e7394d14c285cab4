//! Parked threads for queue workers.
//!
//! A front-end waits for a ring to start (SET_VRING_ENABLE), and creating a thread was most of
//! that. A worker runs on a thread a stopped worker left parked here, if there is one, or on a
//! new one; when it stops, its thread parks here (at most [`MAX_PARKED`]; more end). A running
//! worker's thread has the worker's name (`vqN`), a parked one is `vvu-parked`.

use std::ffi::{CStr, CString};
use std::io;
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::Mutex;

use super::lock;

type Job = Box<dyn FnOnce() + Send>;

/// Most threads kept parked (those of every ring of a daemon's devices that stopped together,
/// up to this many).
pub(super) const MAX_PARKED: usize = 16;

/// The name of a parked thread.
pub(super) const PARKED_NAME: &CStr = c"vvu-parked";

/// Threads parked between workers.
pub(super) struct Pool {
    /// Each parked thread's job queue, the last parked on top.
    parked: Mutex<Vec<Sender<Job>>>,
    max_parked: usize,
}

/// The queue workers' threads.
pub(super) static WORKERS: Pool = Pool::new(MAX_PARKED);

impl Pool {
    pub(super) const fn new(max_parked: usize) -> Self {
        Self {
            parked: Mutex::new(Vec::new()),
            max_parked,
        }
    }

    /// How many threads are parked.
    #[cfg(test)]
    fn parked(&self) -> usize {
        lock(&self.parked).len()
    }

    /// Run `work` on a parked thread, or else on a new one, under the name `name`; the
    /// receiver gets its result, or fails if the thread died before sending it. Fails with
    /// `InvalidInput` for a name with a NUL byte, or with the OS error of a thread that cannot
    /// be created.
    pub(super) fn run<T: Send + 'static>(
        &'static self,
        name: &str,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<Receiver<T>> {
        let thread_name = CString::new(name).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "thread name contains a NUL byte",
            )
        })?;
        let (done, result) = sync_channel(1);
        let mut job: Job = Box::new(move || {
            set_thread_name(&thread_name);
            // Nobody waits any more (the handle went without stopping): drop the result.
            let _ = done.send(work());
        });
        loop {
            let Some(thread) = lock(&self.parked).pop() else {
                break;
            };
            match thread.send(job) {
                Ok(()) => return Ok(result),
                Err(returned) => job = returned.0, // that thread ended meanwhile: the next one
            }
        }
        let (jobs, queue) = channel::<Job>();
        let own = jobs.clone();
        // Cannot fail: `queue` is alive. Sent first, so the new thread starts with it.
        let _ = jobs.send(job);
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || self.park_between_jobs(&own, &queue))?;
        Ok(result)
    }

    /// A pooled thread's life: run each job it is given, park in between.
    fn park_between_jobs(&self, own: &Sender<Job>, queue: &Receiver<Job>) {
        // `own` keeps `queue` open: the thread ends only when enough are parked already.
        while let Ok(job) = queue.recv() {
            job();
            set_thread_name(PARKED_NAME);
            let mut parked = lock(&self.parked);
            if parked.len() >= self.max_parked {
                return;
            }
            parked.push(own.clone());
        }
    }
}

fn set_thread_name(name: &CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string from a pointer valid for the call (the
    // kernel keeps at most 15 bytes of it); it only renames the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn tid() -> i32 {
        // SAFETY: gettid has no preconditions.
        unsafe { libc::gettid() }
    }

    fn name_of(tid: i32) -> String {
        std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
            .unwrap()
            .trim_end()
            .to_owned()
    }

    fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_thread_parks_after_its_job_and_runs_the_next_under_its_name() {
        static POOL: Pool = Pool::new(1);
        let first = POOL.run("vvu-job-1", || (tid(), name_of(tid()))).unwrap();
        let (thread, name) = first.recv().unwrap();
        assert_eq!(name, "vvu-job-1");
        eventually("the thread parked", || POOL.parked() == 1);
        assert_eq!(name_of(thread), "vvu-parked");
        let second = POOL.run("vvu-job-2", || (tid(), name_of(tid()))).unwrap();
        assert_eq!(second.recv().unwrap(), (thread, "vvu-job-2".to_owned()));
        // The result is sent before the thread parks again: were the next job given out before
        // that, it would get a new thread and the one below the parked one.
        eventually("the thread parked again", || POOL.parked() == 1);
        // Two at once: the second needs a thread of its own; one of them parks, the other ends.
        let (hold, release) = sync_channel::<()>(0);
        let busy = POOL
            .run("vvu-busy", move || release.recv().is_ok())
            .unwrap();
        let other = POOL.run("vvu-other", tid).unwrap().recv().unwrap();
        assert_ne!(other, thread);
        eventually("the other thread parked", || POOL.parked() == 1);
        drop(hold);
        assert!(!busy.recv().unwrap());
        eventually("the busy thread ended", || {
            !std::path::Path::new(&format!("/proc/self/task/{thread}")).exists()
        });
        assert_eq!(POOL.parked(), 1);
    }
}
