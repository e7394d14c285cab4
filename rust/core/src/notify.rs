//! Doorbells: eventfds, an epoll poller, busy-polling.
//!
//! - [`EventFd`] is one doorbell: a non-blocking eventfd(2) that is signalled (`write 1`), consumed
//!   (`read`, which returns and resets the counter) and waited on. It is what vhost-user calls a
//!   kick fd (driver → device) or a call fd (device → driver).
//! - [`Poller`] waits on many fds at once (epoll, level-triggered) and reports a `u64` token per
//!   ready fd. It never reads the fds: the caller consumes them.
//!
//! # Interruptible waits
//!
//! Every blocking wait comes in two flavours:
//!
//! - `wait(timeout)` blocks for up to `timeout` (`None` = forever). A signal that interrupts the
//!   underlying syscall (`EINTR`) is retried with the remaining time, because the caller has no
//!   way to react to it.
//! - `wait_interruptible(timeout, check)` sleeps in slices of at most [`WAIT_SLICE`] and calls
//!   `check` after every slice that ended without readiness, including a slice cut short by
//!   `EINTR`. An error from `check` ends the wait and is returned as is; I/O errors are converted
//!   with `E: From<io::Error>`. This is what lets the Python bindings release the GIL while
//!   waiting and still deliver Ctrl-C: `check` re-acquires the GIL and runs
//!   `PyErr_CheckSignals`.
//!
//! Both flavours share one loop, so their timeout, slicing and `EINTR` rules cannot diverge.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::raw::c_int;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Longest sleep of an interruptible wait between two calls of its `check`.
pub const WAIT_SLICE: Duration = Duration::from_millis(50);

/// Most readiness events one [`Poller::wait`] reports. More ready fds are reported by the next
/// wait (readiness is level-triggered, so nothing is lost).
pub const MAX_EVENTS: usize = 64;

/// A check that an interruptible wait calls between slices; an `Err` aborts the wait.
pub type Check<'a, E> = &'a mut dyn FnMut() -> Result<(), E>;

/// Outcome of one bounded attempt inside [`wait_loop`].
enum Step<T> {
    Ready(T),
    /// Timed out, interrupted by a signal, or lost a race: try again if time is left.
    Pending,
}

/// The one wait loop behind every blocking wait of this module.
///
/// `attempt(slice)` waits at most `slice` (`None` = forever) and reports `Step::Pending` for a
/// timeout or `EINTR`. Without `check`, the slice is the whole remaining time and `EINTR` simply
/// loops; with `check`, slices are capped at [`WAIT_SLICE`] and `check` runs after each pending
/// one. Returns `Ok(None)` when `timeout` elapsed.
fn wait_loop<T, E: From<io::Error>>(
    timeout: Option<Duration>,
    mut check: Option<Check<'_, E>>,
    mut attempt: impl FnMut(Option<Duration>) -> io::Result<Step<T>>,
) -> Result<Option<T>, E> {
    // A timeout too large to represent is as good as none.
    let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
    loop {
        let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let slice = match check {
            Some(_) => Some(remaining.map_or(WAIT_SLICE, |r| r.min(WAIT_SLICE))),
            None => remaining,
        };
        if let Step::Ready(value) = attempt(slice)? {
            return Ok(Some(value));
        }
        if let Some(check) = check.as_mut() {
            check()?;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
    }
}

/// Converts a timeout to the milliseconds poll(2)/epoll_wait(2) take: `-1` for forever, rounded
/// up so a sub-millisecond remainder sleeps instead of spinning, clamped to `c_int::MAX`.
fn timeout_ms(timeout: Option<Duration>) -> c_int {
    match timeout {
        None => -1,
        Some(t) => {
            let ms = t.as_nanos().div_ceil(1_000_000);
            c_int::try_from(ms).unwrap_or(c_int::MAX)
        }
    }
}

fn is_eintr(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::Interrupted
}

/// Sets `O_NONBLOCK` (shared with every holder of the open file description) and `FD_CLOEXEC`
/// (local to this descriptor) on `fd`.
fn set_nonblock_cloexec(fd: BorrowedFd<'_>) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: F_GETFL on a valid, borrowed fd has no memory-safety preconditions.
    let flags = unsafe { libc::fcntl(raw, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK == 0 {
        // SAFETY: F_SETFL on a valid, borrowed fd with an int argument.
        if unsafe { libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: F_GETFD on a valid, borrowed fd.
    let fd_flags = unsafe { libc::fcntl(raw, libc::F_GETFD) };
    if fd_flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if fd_flags & libc::FD_CLOEXEC == 0 {
        // SAFETY: F_SETFD on a valid, borrowed fd with an int argument.
        if unsafe { libc::fcntl(raw, libc::F_SETFD, fd_flags | libc::FD_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One doorbell: a non-blocking, close-on-exec eventfd.
///
/// The kernel keeps a 64-bit counter: [`signal`](Self::signal) adds 1, [`consume`](Self::consume)
/// returns the sum of all signals since the last consume and resets it to 0. Clones made with
/// [`try_clone`](Self::try_clone) (and fds sent to a peer) share the same counter.
#[derive(Debug)]
pub struct EventFd {
    fd: OwnedFd,
}

impl EventFd {
    /// Creates a new eventfd with `EFD_NONBLOCK | EFD_CLOEXEC` and a counter of 0.
    pub fn new() -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: eventfd just returned this fd, so it is open and owned by nobody else.
        let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        Ok(Self { fd })
    }

    /// Adopts an eventfd created elsewhere, e.g. a vhost-user kick or call fd received over
    /// `SCM_RIGHTS`.
    ///
    /// Sets `O_NONBLOCK` and `FD_CLOEXEC` on it. `O_NONBLOCK` is a property of the open file
    /// description, so it also changes for the peer that still holds the other end of the same
    /// description (harmless for eventfds used as doorbells, and what other vhost-user back-ends
    /// do too). The fd is not checked to really be an eventfd: a [`consume`](Self::consume) that
    /// reads something other than 8 bytes reports [`io::ErrorKind::InvalidData`].
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        set_nonblock_cloexec(fd.as_fd())?;
        Ok(Self { fd })
    }

    /// Adds 1 to the counter, waking every waiter. Never blocks: if the counter is saturated
    /// (`EAGAIN`), the fd is already readable and the signal counts as delivered.
    pub fn signal(&self) -> io::Result<()> {
        let one: u64 = 1;
        loop {
            // SAFETY: writes 8 bytes from a live local `u64` to an fd we own.
            let n = unsafe {
                libc::write(
                    self.fd.as_raw_fd(),
                    (&one as *const u64).cast::<libc::c_void>(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n == std::mem::size_of::<u64>() as isize {
                return Ok(());
            }
            if n >= 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write of {n} bytes to eventfd"),
                ));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return Ok(()),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
        }
    }

    /// Reads and resets the counter without blocking: the number of signals since the last
    /// consume, or 0 if none is pending.
    pub fn consume(&self) -> io::Result<u64> {
        let mut value: u64 = 0;
        loop {
            // SAFETY: reads at most 8 bytes into a live local `u64` from an fd we own.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    (&mut value as *mut u64).cast::<libc::c_void>(),
                    std::mem::size_of::<u64>(),
                )
            };
            if n == std::mem::size_of::<u64>() as isize {
                return Ok(value);
            }
            if n >= 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("read {n} bytes from an eventfd, expected 8 (not an eventfd?)"),
                ));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(err),
            }
        }
    }

    /// One bounded poll(2) for readability followed by a consume.
    fn wait_once(&self, slice: Option<Duration>) -> io::Result<Step<u64>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid, live pollfd and we pass a count of 1.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms(slice)) };
        if n < 0 {
            let err = io::Error::last_os_error();
            return if is_eintr(&err) {
                Ok(Step::Pending)
            } else {
                Err(err)
            };
        }
        if n == 0 {
            return Ok(Step::Pending);
        }
        match self.consume()? {
            0 if pfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 => Err(io::Error::other(
                format!("poll reported revents {:#x} on eventfd", pfd.revents),
            )),
            // Another holder of the counter consumed it first; keep waiting.
            0 => Ok(Step::Pending),
            count => Ok(Step::Ready(count)),
        }
    }

    /// Waits until the eventfd is signalled or `timeout` elapses (`None` = forever), then
    /// consumes it. Returns `true` if a signal was consumed, `false` on timeout.
    /// `Some(Duration::ZERO)` is a non-blocking check. Signals (`EINTR`) are retried.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<bool> {
        wait_loop::<_, io::Error>(timeout, None, |slice| self.wait_once(slice)).map(|r| r.is_some())
    }

    /// Like [`wait`](Self::wait), but sleeps in slices of at most [`WAIT_SLICE`] (a slice also
    /// ends on `EINTR`) and calls `check` after every slice that found nothing. The first error
    /// from `check` ends the wait and is returned.
    pub fn wait_interruptible<E: From<io::Error>>(
        &self,
        timeout: Option<Duration>,
        check: Check<'_, E>,
    ) -> Result<bool, E> {
        wait_loop(timeout, Some(check), |slice| self.wait_once(slice)).map(|r| r.is_some())
    }

    /// A second handle (`dup` with close-on-exec) to the same eventfd and counter.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: self.fd.try_clone()?,
        })
    }
}

impl AsFd for EventFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for EventFd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<EventFd> for OwnedFd {
    fn from(efd: EventFd) -> OwnedFd {
        efd.fd
    }
}

/// Waits on many fds at once: an epoll instance with a `u64` token per registered fd.
///
/// Readiness is level-triggered and only for reading (`EPOLLIN`; errors and hang-ups are always
/// reported too). [`wait`](Self::wait) does **not** consume anything: the caller must consume
/// each ready eventfd (or read the fd), otherwise it is reported again by the next wait.
///
/// All methods take `&self`, so one thread may register or unregister fds while another waits.
///
/// # Busy-polling
///
/// With [`set_busy_poll`](Self::set_busy_poll), a wait first spins on a non-blocking
/// `epoll_wait` for up to the budget before it sleeps. This trades CPU for latency: while
/// spinning, the waiting thread keeps one core 100% busy (making a syscall every few hundred
/// nanoseconds), on every wait that does not find an event immediately, for up to the full
/// budget. Use it only for short budgets (microseconds) on a thread that has a core to itself;
/// with more spinning threads than cores it makes latency worse, not better.
///
/// # Registrations and closed fds
///
/// epoll tracks the open file description, not the fd number: a registration disappears only
/// once every fd referring to that description is closed (including clones and fds held by a
/// peer). Unregister an fd before closing it.
#[derive(Debug)]
pub struct Poller {
    epfd: OwnedFd,
    /// Busy-poll budget in nanoseconds; 0 = off.
    busy_poll_ns: AtomicU64,
}

impl Poller {
    /// Creates an empty poller (an `EPOLL_CLOEXEC` epoll instance), busy-polling off.
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 has no memory-safety preconditions.
        let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 just returned this fd, so it is open and owned by nobody else.
        let epfd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) };
        Ok(Self {
            epfd,
            busy_poll_ns: AtomicU64::new(0),
        })
    }

    /// Starts watching `fd` for readability; `wait` reports it as `token`. Fails with
    /// [`io::ErrorKind::AlreadyExists`] if `fd` is already registered.
    pub fn register(&self, fd: BorrowedFd<'_>, token: u64) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: both fds are open; `event` is a valid epoll_event that the kernel only reads.
        let r = unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut event,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Stops watching `fd`. Fails with [`io::ErrorKind::NotFound`] if it is not registered.
    pub fn unregister(&self, fd: BorrowedFd<'_>) -> io::Result<()> {
        // Kernels before 2.6.9 require a non-null event even for EPOLL_CTL_DEL.
        let mut event = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: both fds are open; `event` is a valid epoll_event that the kernel ignores.
        let r = unsafe {
            libc::epoll_ctl(
                self.epfd.as_raw_fd(),
                libc::EPOLL_CTL_DEL,
                fd.as_raw_fd(),
                &mut event,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Sets the busy-poll budget (`None` or zero = off). See the type-level docs for the CPU cost.
    pub fn set_busy_poll(&self, budget: Option<Duration>) {
        let ns = budget.map_or(0, |b| u64::try_from(b.as_nanos()).unwrap_or(u64::MAX));
        self.busy_poll_ns.store(ns, Ordering::Relaxed);
    }

    /// The current busy-poll budget, `None` if off.
    pub fn busy_poll(&self) -> Option<Duration> {
        match self.busy_poll_ns.load(Ordering::Relaxed) {
            0 => None,
            ns => Some(Duration::from_nanos(ns)),
        }
    }

    /// One epoll_wait(2); `EINTR` is returned as an error of kind `Interrupted`.
    fn epoll_wait(&self, buf: &mut [libc::epoll_event], timeout: c_int) -> io::Result<usize> {
        let max = c_int::try_from(buf.len()).unwrap_or(c_int::MAX);
        // SAFETY: `buf` is valid for writes of `max` epoll_events for the duration of the call.
        let n = unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), buf.as_mut_ptr(), max, timeout) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// One bounded attempt: spin until `spin_until` (if still ahead, and at most `slice`), then
    /// block for `slice`. Fills `events` with the ready tokens.
    fn wait_once(
        &self,
        slice: Option<Duration>,
        spin_until: Option<Instant>,
        buf: &mut [libc::epoll_event],
        events: &mut Vec<u64>,
    ) -> io::Result<Step<usize>> {
        let result = match spin_until {
            Some(until) if Instant::now() < until => {
                let stop = slice
                    .and_then(|s| Instant::now().checked_add(s))
                    .map_or(until, |s| s.min(until));
                loop {
                    let n = self.epoll_wait(buf, 0);
                    if !matches!(n, Ok(0)) || Instant::now() >= stop {
                        break n;
                    }
                    std::hint::spin_loop();
                }
            }
            _ => self.epoll_wait(buf, timeout_ms(slice)),
        };
        match result {
            Ok(0) => Ok(Step::Pending),
            Ok(n) => {
                events.extend(buf[..n].iter().map(|e| e.u64));
                Ok(Step::Ready(n))
            }
            Err(err) if is_eintr(&err) => Ok(Step::Pending),
            Err(err) => Err(err),
        }
    }

    fn wait_impl<E: From<io::Error>>(
        &self,
        timeout: Option<Duration>,
        events: &mut Vec<u64>,
        check: Option<Check<'_, E>>,
    ) -> Result<usize, E> {
        events.clear();
        let spin_until = self.busy_poll().and_then(|budget| {
            let budget = timeout.map_or(budget, |t| t.min(budget));
            Instant::now().checked_add(budget)
        });
        let mut buf = [libc::epoll_event { events: 0, u64: 0 }; MAX_EVENTS];
        let ready = wait_loop(timeout, check, |slice| {
            self.wait_once(slice, spin_until, &mut buf, events)
        })?;
        Ok(ready.unwrap_or(0))
    }

    /// Waits until at least one registered fd is readable or `timeout` elapses (`None` =
    /// forever). Clears `events`, fills it with the tokens of the ready fds (at most
    /// [`MAX_EVENTS`]) and returns their number; 0 means timeout. Consumes nothing. Signals
    /// (`EINTR`) are retried.
    pub fn wait(&self, timeout: Option<Duration>, events: &mut Vec<u64>) -> io::Result<usize> {
        self.wait_impl::<io::Error>(timeout, events, None)
    }

    /// Like [`wait`](Self::wait), but sleeps (or busy-polls) in slices of at most
    /// [`WAIT_SLICE`] (a slice also ends on `EINTR`) and calls `check` after every slice that
    /// found nothing. The first error from `check` ends the wait and is returned.
    pub fn wait_interruptible<E: From<io::Error>>(
        &self,
        timeout: Option<Duration>,
        events: &mut Vec<u64>,
        check: Check<'_, E>,
    ) -> Result<usize, E> {
        self.wait_impl(timeout, events, Some(check))
    }
}

impl AsFd for Poller {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }
}

impl AsRawFd for Poller {
    fn as_raw_fd(&self) -> RawFd {
        self.epfd.as_raw_fd()
    }
}

/// Token the [`EventForwarder`] reserves for its own stop eventfd.
const FORWARDER_STOP: u64 = u64::MAX;

/// One route of an [`EventForwarder`]: signals on `src` become one signal on `dst`.
#[derive(Debug)]
struct Route {
    src: EventFd,
    dst: Option<EventFd>,
    forwarded: u64,
}

#[derive(Debug)]
struct ForwarderShared {
    poller: Poller,
    stop: EventFd,
    routes: std::sync::Mutex<std::collections::HashMap<u64, Route>>,
}

impl ForwarderShared {
    fn routes(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Route>> {
        // A poisoned lock only means a thread panicked while holding it; the map stays usable.
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The forwarding thread: wait, consume each ready source, signal its destination.
    fn run(&self) {
        let mut events = Vec::new();
        loop {
            if let Err(err) = self.poller.wait(None, &mut events) {
                eprintln!("vvu EventForwarder: wait failed, stopping: {err}");
                return;
            }
            for &token in &events {
                if token == FORWARDER_STOP {
                    return;
                }
                let mut routes = self.routes();
                // A route removed after epoll reported it is simply gone.
                if let Some(route) = routes.get_mut(&token) {
                    match route.src.consume() {
                        Ok(0) => {}
                        Ok(_) => {
                            if let Some(dst) = &route.dst {
                                if dst.signal().is_ok() {
                                    route.forwarded += 1;
                                }
                            }
                        }
                        Err(_) => {
                            // Not readable as an eventfd: stop watching it rather than spin.
                            let _ = self.poller.unregister(route.src.as_fd());
                        }
                    }
                }
            }
        }
    }
}

/// Forwards eventfd signals natively: one thread with an epoll [`Poller`] watches every source
/// eventfd, consumes it and signals its destination (or drops the signal when the route has no
/// destination). One hop, no interpreter on the path: the VVU device uses it to turn a
/// front-end's kick eventfds into MSI-X interrupt eventfds.
///
/// Routes are keyed by a caller-chosen `u64` token (`u64::MAX` is reserved). The forwarder owns
/// its handles (pass clones); dropping it stops and joins the thread.
#[derive(Debug)]
pub struct EventForwarder {
    shared: std::sync::Arc<ForwarderShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EventForwarder {
    /// Starts the forwarding thread with no routes.
    pub fn new() -> io::Result<Self> {
        let shared = std::sync::Arc::new(ForwarderShared {
            poller: Poller::new()?,
            stop: EventFd::new()?,
            routes: std::sync::Mutex::new(std::collections::HashMap::new()),
        });
        shared
            .poller
            .register(shared.stop.as_fd(), FORWARDER_STOP)?;
        let worker = std::sync::Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("vvu-forwarder".into())
            .spawn(move || worker.run())?;
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// Forwards `src` to `dst` (`None`: consume and drop) as route `token`. Fails with
    /// [`io::ErrorKind::AlreadyExists`] if the token is taken, [`io::ErrorKind::InvalidInput`]
    /// for the reserved token.
    pub fn add(&self, src: EventFd, dst: Option<EventFd>, token: u64) -> io::Result<()> {
        if token == FORWARDER_STOP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "token u64::MAX is reserved",
            ));
        }
        let mut routes = self.shared.routes();
        if routes.contains_key(&token) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("route {token} exists"),
            ));
        }
        self.shared.poller.register(src.as_fd(), token)?;
        routes.insert(
            token,
            Route {
                src,
                dst,
                forwarded: 0,
            },
        );
        Ok(())
    }

    /// Stops route `token` and closes its handles; `false` if there was no such route.
    pub fn remove(&self, token: u64) -> bool {
        let mut routes = self.shared.routes();
        match routes.remove(&token) {
            Some(route) => {
                let _ = self.shared.poller.unregister(route.src.as_fd());
                true
            }
            None => false,
        }
    }

    /// Changes route `token`'s destination (`None`: drop signals); `false` if no such route.
    pub fn set_dst(&self, token: u64, dst: Option<EventFd>) -> bool {
        match self.shared.routes().get_mut(&token) {
            Some(route) => {
                route.dst = dst;
                true
            }
            None => false,
        }
    }

    /// How many times route `token` signalled its destination (`None`: no such route).
    pub fn forwarded(&self, token: u64) -> Option<u64> {
        self.shared.routes().get(&token).map(|r| r.forwarded)
    }

    /// The tokens of the current routes, sorted.
    pub fn tokens(&self) -> Vec<u64> {
        let mut tokens: Vec<u64> = self.shared.routes().keys().copied().collect();
        tokens.sort_unstable();
        tokens
    }

    /// Stops and joins the thread and drops every route (idempotent; also done on drop).
    pub fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = self.shared.stop.signal();
            let _ = thread.join();
        }
        let mut routes = self.shared.routes();
        for route in routes.values() {
            let _ = self.shared.poller.unregister(route.src.as_fd());
        }
        routes.clear();
    }

    /// Whether the thread runs.
    pub fn running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }
}

impl Drop for EventForwarder {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::FromRawFd;
    use std::sync::atomic::{AtomicBool, AtomicUsize};
    use std::sync::Arc;
    use std::thread;

    /// Generous bound for "promptly": catches a hang, not a slow machine.
    const PROMPT: Duration = Duration::from_secs(10);

    #[derive(Debug, PartialEq, Eq)]
    enum TestError {
        Io(io::ErrorKind),
        Stop,
    }

    impl From<io::Error> for TestError {
        fn from(e: io::Error) -> Self {
            TestError::Io(e.kind())
        }
    }

    fn raw_eventfd(flags: c_int) -> OwnedFd {
        // SAFETY: eventfd has no memory-safety preconditions.
        let raw = unsafe { libc::eventfd(0, flags) };
        assert!(raw >= 0, "eventfd: {}", io::Error::last_os_error());
        // SAFETY: freshly created fd, owned by nobody else.
        unsafe { OwnedFd::from_raw_fd(raw) }
    }

    fn write_u64(fd: RawFd, value: u64) {
        // SAFETY: writes 8 bytes from a live local to an open fd.
        let n = unsafe {
            libc::write(
                fd,
                (&value as *const u64).cast::<libc::c_void>(),
                std::mem::size_of::<u64>(),
            )
        };
        assert_eq!(n, 8, "write: {}", io::Error::last_os_error());
    }

    fn fd_flags(fd: RawFd) -> (c_int, c_int) {
        // SAFETY: F_GETFL/F_GETFD on an open fd.
        unsafe {
            (
                libc::fcntl(fd, libc::F_GETFL),
                libc::fcntl(fd, libc::F_GETFD),
            )
        }
    }

    #[test]
    fn new_is_nonblocking_and_cloexec() {
        let efd = EventFd::new().unwrap();
        let (fl, fdfl) = fd_flags(efd.as_raw_fd());
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0);
    }

    #[test]
    fn signal_then_consume() {
        let efd = EventFd::new().unwrap();
        assert_eq!(efd.consume().unwrap(), 0);
        efd.signal().unwrap();
        assert_eq!(efd.consume().unwrap(), 1);
        assert_eq!(efd.consume().unwrap(), 0);
    }

    #[test]
    fn signals_accumulate_in_the_counter() {
        let efd = EventFd::new().unwrap();
        efd.signal().unwrap();
        efd.signal().unwrap();
        assert_eq!(efd.consume().unwrap(), 2);
        assert_eq!(efd.consume().unwrap(), 0);
    }

    #[test]
    fn signal_on_saturated_counter_counts_as_signalled() {
        let efd = EventFd::new().unwrap();
        let max = u64::MAX - 1; // the largest value an eventfd counter can hold
        write_u64(efd.as_raw_fd(), max);
        efd.signal().unwrap(); // EAGAIN, reported as success
        assert!(efd.wait(Some(Duration::ZERO)).unwrap());
        assert_eq!(efd.consume().unwrap(), 0);
        write_u64(efd.as_raw_fd(), max);
        efd.signal().unwrap();
        assert_eq!(efd.consume().unwrap(), max);
    }

    #[test]
    fn wait_returns_true_and_consumes_when_signalled() {
        let efd = EventFd::new().unwrap();
        efd.signal().unwrap();
        assert!(efd.wait(Some(Duration::from_secs(5))).unwrap());
        assert_eq!(efd.consume().unwrap(), 0);
        efd.signal().unwrap();
        assert!(efd.wait(None).unwrap());
    }

    #[test]
    fn wait_times_out_when_not_signalled() {
        let efd = EventFd::new().unwrap();
        assert!(!efd.wait(Some(Duration::ZERO)).unwrap());
        let timeout = Duration::from_millis(100);
        let start = Instant::now();
        assert!(!efd.wait(Some(timeout)).unwrap());
        assert!(start.elapsed() >= timeout.mul_f32(0.9));
    }

    #[test]
    fn signal_from_another_thread_wakes_a_blocked_wait() {
        let efd = Arc::new(EventFd::new().unwrap());
        let waiter = {
            let efd = Arc::clone(&efd);
            thread::spawn(move || efd.wait(Some(Duration::from_secs(30))).unwrap())
        };
        thread::sleep(Duration::from_millis(50));
        efd.signal().unwrap();
        assert!(waiter.join().unwrap());
    }

    #[test]
    fn clone_shares_the_counter() {
        let efd = EventFd::new().unwrap();
        let clone = efd.try_clone().unwrap();
        assert_ne!(efd.as_raw_fd(), clone.as_raw_fd());
        clone.signal().unwrap();
        clone.signal().unwrap();
        assert_eq!(efd.consume().unwrap(), 2);
        drop(efd);
        clone.signal().unwrap();
        assert!(clone.wait(Some(Duration::ZERO)).unwrap());
    }

    #[test]
    fn adopting_a_blocking_eventfd_makes_it_nonblocking() {
        // As a peer would create it: blocking, inheritable.
        let peer = raw_eventfd(0);
        let peer_dup = peer.try_clone().unwrap();
        let efd = EventFd::from_fd(peer).unwrap();
        let (fl, fdfl) = fd_flags(efd.as_raw_fd());
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fdfl & libc::FD_CLOEXEC, 0);
        // Would hang if the fd were still blocking.
        assert_eq!(efd.consume().unwrap(), 0);
        assert!(!efd.wait(Some(Duration::from_millis(10))).unwrap());
        // The peer's signals arrive, and ours reach the peer.
        write_u64(peer_dup.as_raw_fd(), 3);
        assert_eq!(efd.consume().unwrap(), 3);
        efd.signal().unwrap();
        let peer_side = EventFd::from_fd(peer_dup).unwrap();
        assert_eq!(peer_side.consume().unwrap(), 1);
        // And it can be handed on as an OwnedFd.
        let owned: OwnedFd = efd.into();
        assert!(owned.as_raw_fd() >= 0);
    }

    #[test]
    fn consume_rejects_a_non_eventfd() {
        let mut fds = [0 as c_int; 2];
        // SAFETY: `fds` has room for the two fds pipe2 writes.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: freshly created fds, owned by nobody else.
        let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let not_an_eventfd = EventFd::from_fd(rd).unwrap();
        // SAFETY: writes 1 byte from a live local to an open fd.
        let n = unsafe { libc::write(wr.as_raw_fd(), [7u8].as_ptr().cast(), 1) };
        assert_eq!(n, 1);
        let err = not_an_eventfd.consume().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn interruptible_wait_returns_the_check_error_promptly() {
        let efd = EventFd::new().unwrap();
        let mut calls = 0;
        let mut check = || {
            calls += 1;
            if calls == 3 {
                Err(TestError::Stop)
            } else {
                Ok(())
            }
        };
        let start = Instant::now();
        assert_eq!(
            efd.wait_interruptible(None, &mut check),
            Err(TestError::Stop)
        );
        assert!(start.elapsed() < PROMPT);
        assert_eq!(calls, 3);
    }

    #[test]
    fn interruptible_wait_checks_between_slices_and_times_out() {
        let efd = EventFd::new().unwrap();
        let mut calls = 0;
        let mut check = || -> io::Result<()> {
            calls += 1;
            Ok(())
        };
        let timeout = Duration::from_millis(200);
        let start = Instant::now();
        assert!(!efd.wait_interruptible(Some(timeout), &mut check).unwrap());
        assert!(start.elapsed() >= timeout.mul_f32(0.9));
        // Slices are at most 50 ms, so a 200 ms wait checks several times.
        assert!(calls >= 3, "check called {calls} times");
    }

    #[test]
    fn interruptible_wait_does_not_check_when_already_signalled() {
        let efd = EventFd::new().unwrap();
        efd.signal().unwrap();
        let mut check = || Err(TestError::Stop);
        assert_eq!(efd.wait_interruptible(None, &mut check), Ok(true));
    }

    #[test]
    fn interruptible_wait_is_woken_by_another_thread() {
        let efd = Arc::new(EventFd::new().unwrap());
        let signaller = {
            let efd = Arc::clone(&efd);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(120));
                efd.signal().unwrap();
            })
        };
        let mut check = || -> io::Result<()> { Ok(()) };
        assert!(efd
            .wait_interruptible(Some(Duration::from_secs(30)), &mut check)
            .unwrap());
        signaller.join().unwrap();
    }

    static SIGNALLED: AtomicBool = AtomicBool::new(false);

    extern "C" fn note_signal(_: c_int) {
        SIGNALLED.store(true, Ordering::SeqCst);
    }

    /// Installs a SIGUSR1 handler without SA_RESTART, as Python's signal module does.
    fn install_sigusr1_handler() {
        // SAFETY: sigaction is plain data; all-zero is a valid empty mask and no flags.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        action.sa_sigaction = note_signal as *const () as libc::sighandler_t;
        // SAFETY: `action` is valid; the handler only stores to an atomic (async-signal-safe).
        let r = unsafe { libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) };
        assert_eq!(r, 0);
    }

    /// Sends SIGUSR1 to `thread` every 20 ms until it finishes (returns or panics).
    fn pester(thread: &thread::JoinHandle<impl Sized>) -> usize {
        use std::os::unix::thread::JoinHandleExt;
        let mut sent = 0;
        while !thread.is_finished() {
            // SAFETY: the thread has not been joined, so its pthread_t is still valid.
            unsafe { libc::pthread_kill(thread.as_pthread_t(), libc::SIGUSR1) };
            sent += 1;
            thread::sleep(Duration::from_millis(20));
        }
        sent
    }

    #[test]
    fn signals_interrupt_only_interruptible_waits() {
        install_sigusr1_handler();

        // A plain wait retries EINTR: it still runs to its timeout and reports no signal.
        let timeout = Duration::from_millis(200);
        let waiter = thread::spawn(move || {
            let efd = EventFd::new().unwrap();
            let start = Instant::now();
            let signalled = efd.wait(Some(timeout)).unwrap();
            (signalled, start.elapsed())
        });
        let sent = pester(&waiter);
        let (signalled, elapsed) = waiter.join().unwrap();
        assert!(!signalled);
        assert!(elapsed >= timeout.mul_f32(0.9));
        assert!(sent > 0);

        // An interruptible wait lets the check see the signal, like PyErr_CheckSignals.
        SIGNALLED.store(false, Ordering::SeqCst);
        let waiter = thread::spawn(move || {
            let efd = EventFd::new().unwrap();
            let mut check = || {
                if SIGNALLED.load(Ordering::SeqCst) {
                    Err(TestError::Stop)
                } else {
                    Ok(())
                }
            };
            let start = Instant::now();
            let result = efd.wait_interruptible(Some(PROMPT * 3), &mut check);
            (result, start.elapsed())
        });
        pester(&waiter);
        let (result, elapsed) = waiter.join().unwrap();
        assert_eq!(result, Err(TestError::Stop));
        assert!(elapsed < PROMPT);
    }

    fn sorted(mut v: Vec<u64>) -> Vec<u64> {
        v.sort_unstable();
        v
    }

    #[test]
    fn poller_reports_the_tokens_of_ready_fds() {
        let poller = Poller::new().unwrap();
        let efds: Vec<EventFd> = (0..4).map(|_| EventFd::new().unwrap()).collect();
        for (i, efd) in efds.iter().enumerate() {
            poller.register(efd.as_fd(), 100 + i as u64).unwrap();
        }
        let mut events = vec![999];
        assert_eq!(poller.wait(Some(Duration::ZERO), &mut events).unwrap(), 0);
        assert!(events.is_empty());

        efds[1].signal().unwrap();
        efds[3].signal().unwrap();
        assert_eq!(
            poller
                .wait(Some(Duration::from_secs(5)), &mut events)
                .unwrap(),
            2
        );
        assert_eq!(sorted(events.clone()), vec![101, 103]);

        // Level-triggered and not consumed: reported again until the caller consumes.
        assert_eq!(poller.wait(None, &mut events).unwrap(), 2);
        assert_eq!(sorted(events.clone()), vec![101, 103]);
        assert_eq!(efds[1].consume().unwrap(), 1);
        assert_eq!(poller.wait(Some(Duration::ZERO), &mut events).unwrap(), 1);
        assert_eq!(events, vec![103]);
        assert_eq!(efds[3].consume().unwrap(), 1);

        let timeout = Duration::from_millis(100);
        let start = Instant::now();
        assert_eq!(poller.wait(Some(timeout), &mut events).unwrap(), 0);
        assert!(start.elapsed() >= timeout.mul_f32(0.9));
    }

    #[test]
    fn poller_register_twice_and_unregister() {
        let poller = Poller::new().unwrap();
        let a = EventFd::new().unwrap();
        let b = EventFd::new().unwrap();
        poller.register(a.as_fd(), 1).unwrap();
        poller.register(b.as_fd(), 2).unwrap();
        let err = poller.register(a.as_fd(), 3).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);

        poller.unregister(a.as_fd()).unwrap();
        a.signal().unwrap();
        let mut events = Vec::new();
        assert_eq!(
            poller
                .wait(Some(Duration::from_millis(20)), &mut events)
                .unwrap(),
            0
        );
        b.signal().unwrap();
        assert_eq!(
            poller
                .wait(Some(Duration::from_secs(5)), &mut events)
                .unwrap(),
            1
        );
        assert_eq!(events, vec![2]);

        let err = poller.unregister(a.as_fd()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        // Re-registering under a new token works.
        poller.register(a.as_fd(), 7).unwrap();
        assert_eq!(poller.wait(None, &mut events).unwrap(), 2);
        assert_eq!(sorted(events.clone()), vec![2, 7]);
    }

    #[test]
    fn poller_is_woken_from_another_thread() {
        let poller = Poller::new().unwrap();
        let efd = Arc::new(EventFd::new().unwrap());
        poller.register(efd.as_fd(), 42).unwrap();
        let signaller = {
            let efd = Arc::clone(&efd);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(50));
                efd.signal().unwrap();
            })
        };
        let mut events = Vec::new();
        assert_eq!(
            poller
                .wait(Some(Duration::from_secs(30)), &mut events)
                .unwrap(),
            1
        );
        assert_eq!(events, vec![42]);
        signaller.join().unwrap();
    }

    #[test]
    fn poller_reports_more_than_max_events_over_several_waits() {
        let poller = Poller::new().unwrap();
        let efds: Vec<EventFd> = (0..MAX_EVENTS + 5)
            .map(|_| EventFd::new().unwrap())
            .collect();
        for (i, efd) in efds.iter().enumerate() {
            poller.register(efd.as_fd(), i as u64).unwrap();
            efd.signal().unwrap();
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut events = Vec::new();
        while seen.len() < efds.len() {
            let n = poller.wait(Some(Duration::ZERO), &mut events).unwrap();
            assert!(n > 0 && n <= MAX_EVENTS);
            for &token in &events {
                efds[token as usize].consume().unwrap();
                seen.insert(token);
            }
        }
        assert_eq!(poller.wait(Some(Duration::ZERO), &mut events).unwrap(), 0);
    }

    #[test]
    fn busy_poll_finds_events_and_respects_timeouts() {
        let poller = Poller::new().unwrap();
        assert_eq!(poller.busy_poll(), None);
        poller.set_busy_poll(Some(Duration::from_millis(20)));
        assert_eq!(poller.busy_poll(), Some(Duration::from_millis(20)));

        let efd = Arc::new(EventFd::new().unwrap());
        poller.register(efd.as_fd(), 5).unwrap();
        let mut events = Vec::new();

        // Already ready.
        efd.signal().unwrap();
        assert_eq!(poller.wait(None, &mut events).unwrap(), 1);
        assert_eq!(events, vec![5]);
        efd.consume().unwrap();

        // Signalled while spinning, or after the spin when blocked: found either way.
        let signaller = {
            let efd = Arc::clone(&efd);
            thread::spawn(move || {
                thread::sleep(Duration::from_millis(5));
                efd.signal().unwrap();
            })
        };
        assert_eq!(
            poller
                .wait(Some(Duration::from_secs(30)), &mut events)
                .unwrap(),
            1
        );
        assert_eq!(events, vec![5]);
        efd.consume().unwrap();
        signaller.join().unwrap();

        // Nothing comes: times out after at least the timeout (spin, then block).
        let timeout = Duration::from_millis(60);
        let start = Instant::now();
        assert_eq!(poller.wait(Some(timeout), &mut events).unwrap(), 0);
        assert!(start.elapsed() >= timeout.mul_f32(0.9));

        // A budget longer than the timeout is capped by the timeout.
        poller.set_busy_poll(Some(Duration::from_secs(3600)));
        let start = Instant::now();
        assert_eq!(
            poller
                .wait(Some(Duration::from_millis(30)), &mut events)
                .unwrap(),
            0
        );
        assert!(start.elapsed() < PROMPT);
        assert_eq!(poller.wait(Some(Duration::ZERO), &mut events).unwrap(), 0);

        poller.set_busy_poll(None);
        assert_eq!(poller.busy_poll(), None);
        efd.signal().unwrap();
        assert_eq!(poller.wait(None, &mut events).unwrap(), 1);
    }

    #[test]
    fn poller_interruptible_wait_returns_the_check_error_promptly() {
        for busy in [None, Some(Duration::from_secs(3600))] {
            let poller = Poller::new().unwrap();
            poller.set_busy_poll(busy);
            let efd = EventFd::new().unwrap();
            poller.register(efd.as_fd(), 1).unwrap();
            let calls = AtomicUsize::new(0);
            let mut check = || {
                if calls.fetch_add(1, Ordering::SeqCst) == 1 {
                    Err(TestError::Stop)
                } else {
                    Ok(())
                }
            };
            let mut events = Vec::new();
            let start = Instant::now();
            let result = poller.wait_interruptible(None, &mut events, &mut check);
            assert_eq!(result, Err(TestError::Stop), "busy poll {busy:?}");
            assert!(start.elapsed() < PROMPT);
            assert_eq!(calls.load(Ordering::SeqCst), 2);

            // And with an event pending it returns the tokens without checking.
            efd.signal().unwrap();
            let mut never = || Err(TestError::Stop);
            assert_eq!(
                poller.wait_interruptible(None, &mut events, &mut never),
                Ok(1)
            );
            assert_eq!(events, vec![1]);
        }
    }

    #[test]
    fn poller_interruptible_wait_times_out() {
        let poller = Poller::new().unwrap();
        let mut calls = 0;
        let mut check = || -> io::Result<()> {
            calls += 1;
            Ok(())
        };
        let mut events = Vec::new();
        let timeout = Duration::from_millis(150);
        let start = Instant::now();
        assert_eq!(
            poller
                .wait_interruptible(Some(timeout), &mut events, &mut check)
                .unwrap(),
            0
        );
        assert!(start.elapsed() >= timeout.mul_f32(0.9));
        assert!(calls >= 2, "check called {calls} times");
    }

    #[test]
    fn timeout_conversion() {
        assert_eq!(timeout_ms(None), -1);
        assert_eq!(timeout_ms(Some(Duration::ZERO)), 0);
        assert_eq!(timeout_ms(Some(Duration::from_micros(1))), 1);
        assert_eq!(timeout_ms(Some(Duration::from_millis(50))), 50);
        assert_eq!(timeout_ms(Some(Duration::from_secs(u64::MAX))), c_int::MAX);
    }

    #[test]
    fn forwarder_forwards_removes_and_redirects() {
        let mut fwd = EventForwarder::new().unwrap();
        let src = EventFd::new().unwrap();
        let dst = EventFd::new().unwrap();
        let dst2 = EventFd::new().unwrap();
        fwd.add(src.try_clone().unwrap(), Some(dst.try_clone().unwrap()), 7)
            .unwrap();
        assert_eq!(
            fwd.add(src.try_clone().unwrap(), None, 7)
                .unwrap_err()
                .kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(
            fwd.add(src.try_clone().unwrap(), None, u64::MAX)
                .unwrap_err()
                .kind(),
            io::ErrorKind::InvalidInput
        );
        src.signal().unwrap();
        assert!(dst.wait(Some(Duration::from_secs(5))).unwrap());
        // The source was consumed by the forwarder.
        assert_eq!(src.consume().unwrap(), 0);
        assert_eq!(fwd.forwarded(7), Some(1));
        // Redirect, then drop.
        assert!(fwd.set_dst(7, Some(dst2.try_clone().unwrap())));
        src.signal().unwrap();
        assert!(dst2.wait(Some(Duration::from_secs(5))).unwrap());
        assert!(fwd.set_dst(7, None));
        src.signal().unwrap();
        for _ in 0..500 {
            if src.consume().unwrap() == 0 && fwd.forwarded(7) == Some(2) {
                break;
            }
            thread::sleep(Duration::from_millis(2));
        }
        assert!(!dst.wait(Some(Duration::from_millis(50))).unwrap());
        assert!(!dst2.wait(Some(Duration::from_millis(50))).unwrap());
        assert_eq!(fwd.tokens(), vec![7]);
        assert!(fwd.remove(7));
        assert!(!fwd.remove(7));
        assert!(!fwd.set_dst(7, None));
        src.signal().unwrap();
        thread::sleep(Duration::from_millis(20));
        assert_eq!(src.consume().unwrap(), 1); // nobody consumes a removed route
        assert!(fwd.running());
        fwd.stop();
        assert!(!fwd.running());
        fwd.stop();
    }

    #[test]
    fn forwarder_many_routes_and_drop_joins() {
        let fwd = EventForwarder::new().unwrap();
        let pairs: Vec<(EventFd, EventFd)> = (0..20)
            .map(|_| (EventFd::new().unwrap(), EventFd::new().unwrap()))
            .collect();
        for (i, (s, d)) in pairs.iter().enumerate() {
            fwd.add(
                s.try_clone().unwrap(),
                Some(d.try_clone().unwrap()),
                i as u64,
            )
            .unwrap();
        }
        for (s, _) in &pairs {
            s.signal().unwrap();
        }
        for (_, d) in &pairs {
            assert!(d.wait(Some(Duration::from_secs(5))).unwrap());
        }
        drop(fwd);
        pairs[0].0.signal().unwrap();
        assert!(!pairs[0].1.wait(Some(Duration::from_millis(50))).unwrap());
    }
}
