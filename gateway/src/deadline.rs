//! Whole-request deadlines without a timer per request.
//!
//! A request waits on its backend under the request timeout (SPEC §7: 504 when it passes).
//! A tokio timer armed per request wakes the runtime's driver through its eventfd (a
//! `write` and an extra `epoll_wait`, measured), and Pingora's timer wheel costs a lock, a
//! map lookup, a shared notifier and an allocation per registration (about 5% of a request's
//! instructions, measured with callgrind). The timeouts here are seconds long and need no
//! millisecond precision, so each worker thread keeps its waiting requests in a list and one
//! ticker task per thread looks at it every [`TICK`]: registering is a push, finishing a
//! removal, and a deadline fires at most one tick late. The ticker stops when nothing waits.
//!
//! A request runs on one thread from start to end (per-thread runtimes without work
//! stealing), so the list is thread-local; a registration dropped on another thread would be
//! left to expire, never confused with a newer one (slots carry a generation).
//!
//! The same ticker keeps the HTTP/1 connections' clocks between requests ([`ConnClock`]): a
//! connection registers once, for its life, and waiting for its next request marks its slot
//! (no clock read, no timer, no channel waiter per request). The ticker closes a wait that
//! lasted the idle timeout (measured from the first tick that saw it: `idle` to `idle` + 2
//! ticks), and ends every wait once the shutdown signal is up.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// How often a worker thread looks for passed deadlines.
pub const TICK: Duration = Duration::from_millis(50);

/// An entry that fired and was not collected by its owner is dropped after this long.
const STALE: Duration = Duration::from_secs(10);

/// The deadline passed before the awaited step finished.
#[derive(Debug, PartialEq, Eq)]
pub struct TimedOut;

struct Entry {
    deadline: Instant,
    generation: u64,
    waker: Option<Waker>,
    fired: bool,
}

#[derive(Default)]
struct Deadlines {
    /// Tells this thread's list from another's.
    list: u64,
    slots: Vec<Option<Entry>>,
    free: Vec<usize>,
    next_generation: u64,
    live: usize,
    ticking: bool,
    /// The connections' clocks ([`ConnClock`]).
    conns: Vec<Option<Conn>>,
    conns_free: Vec<usize>,
    /// The shutdown signals of the connections registered (one, in practice).
    shutdown: Vec<watch::Receiver<bool>>,
}

impl Deadlines {
    /// Starts this thread's ticker unless it runs.
    fn tick_on(&mut self) {
        if !self.ticking {
            self.ticking = true;
            tokio::spawn(ticker());
        }
    }

    fn idle(&self) -> bool {
        self.live == 0 && self.conns.len() == self.conns_free.len()
    }
}

static LISTS: AtomicU64 = AtomicU64::new(1);

thread_local! {
    static DEADLINES: RefCell<Deadlines> = RefCell::new(Deadlines {
        list: LISTS.fetch_add(1, Ordering::Relaxed),
        ..Deadlines::default()
    });
}

/// A deadline in this thread's list, removed when dropped.
struct Registration {
    list: u64,
    slot: usize,
    generation: u64,
}

impl Registration {
    fn new(deadline: Instant, waker: &Waker) -> Registration {
        DEADLINES.with(|d| {
            let mut d = d.borrow_mut();
            d.next_generation += 1;
            let generation = d.next_generation;
            let entry = Entry {
                deadline,
                generation,
                waker: Some(waker.clone()),
                fired: false,
            };
            let slot = match d.free.pop() {
                Some(i) => {
                    d.slots[i] = Some(entry);
                    i
                }
                None => {
                    d.slots.push(Some(entry));
                    d.slots.len() - 1
                }
            };
            d.live += 1;
            d.tick_on();
            Registration {
                list: d.list,
                slot,
                generation,
            }
        })
    }

    /// Whether the deadline passed; else keeps the latest waker.
    fn fired(&self, waker: &Waker) -> bool {
        DEADLINES.with(|d| {
            let mut d = d.borrow_mut();
            if d.list != self.list {
                return false;
            }
            match d.slots.get_mut(self.slot) {
                Some(Some(e)) if e.generation == self.generation => {
                    if e.fired {
                        return true;
                    }
                    match &e.waker {
                        Some(w) if w.will_wake(waker) => {}
                        _ => e.waker = Some(waker.clone()),
                    }
                    false
                }
                // Collected as stale: it fired long ago.
                _ => true,
            }
        })
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let _ = DEADLINES.try_with(|d| {
            let mut d = d.borrow_mut();
            if d.list != self.list {
                return;
            }
            let mine = matches!(
                d.slots.get(self.slot),
                Some(Some(e)) if e.generation == self.generation
            );
            if mine {
                d.slots[self.slot] = None;
                d.free.push(self.slot);
                d.live -= 1;
            }
        });
    }
}

/// Wakes the requests whose deadline passed, and the connections whose wait for a request
/// ended ([`on_tick`]), every [`TICK`], while any is waiting or open.
async fn ticker() {
    let mut wake = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let stop = DEADLINES.with(|d| {
            let mut d = d.borrow_mut();
            let shutting_down = d.shutdown.iter().any(|w| *w.borrow());
            for c in d.conns.iter_mut().flatten() {
                let was = c.wait;
                c.wait = on_tick(was, now, c.idle, shutting_down);
                if c.wait != was && matches!(c.wait, Wait::Ended(_)) {
                    wake.extend(c.waker.take());
                }
            }
            let mut stale = Vec::new();
            for (i, slot) in d.slots.iter_mut().enumerate() {
                let Some(e) = slot else { continue };
                if !e.fired && e.deadline <= now {
                    e.fired = true;
                    wake.extend(e.waker.take());
                } else if e.fired && now.saturating_duration_since(e.deadline) > STALE {
                    stale.push(i);
                }
            }
            for i in stale {
                d.slots[i] = None;
                d.free.push(i);
                d.live -= 1;
            }
            if d.idle() {
                d.ticking = false;
                d.shutdown.clear();
            }
            !d.ticking
        });
        // Woken outside the borrow: a waker may run code that registers a deadline.
        for w in wake.drain(..) {
            w.wake();
        }
        if stop {
            return;
        }
    }
}

/// Why a connection's wait for its next request ended without one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woken {
    /// Nothing came for the idle timeout.
    Idle,
    /// The server is shutting down.
    Shutdown,
}

/// Where a connection is between its requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// Serving a request (or not yet waiting).
    Busy,
    /// Waiting for a request: since the tick that first saw it (`None` before that tick).
    Since(Option<Instant>),
    /// The wait ended without a request; the connection has not collected it yet.
    Ended(Woken),
}

/// What a tick at `now` makes of a connection's wait (pure): a wait is timed from the first
/// tick that sees it (never from before it began: a connection is not closed early), ends
/// after `idle`, and every wait ends once the server is shutting down.
fn on_tick(wait: Wait, now: Instant, idle: Duration, shutting_down: bool) -> Wait {
    match wait {
        Wait::Since(_) if shutting_down => Wait::Ended(Woken::Shutdown),
        Wait::Since(None) => Wait::Since(Some(now)),
        Wait::Since(Some(t)) if now.saturating_duration_since(t) >= idle => {
            Wait::Ended(Woken::Idle)
        }
        w => w,
    }
}

/// A connection's slot.
struct Conn {
    generation: u64,
    idle: Duration,
    wait: Wait,
    waker: Option<Waker>,
}

/// An HTTP/1 connection's idle and shutdown clocks, registered once for its life in this
/// thread's list (removed when dropped). [`ConnClock::wait`] runs the read of a request
/// head until the ticker ends the wait.
pub struct ConnClock {
    list: u64,
    slot: usize,
    generation: u64,
}

impl ConnClock {
    pub fn new(idle: Duration, shutdown: &watch::Receiver<bool>) -> ConnClock {
        DEADLINES.with(|d| {
            let mut d = d.borrow_mut();
            d.next_generation += 1;
            let generation = d.next_generation;
            let conn = Conn {
                generation,
                idle,
                wait: Wait::Busy,
                waker: None,
            };
            let slot = match d.conns_free.pop() {
                Some(i) => {
                    d.conns[i] = Some(conn);
                    i
                }
                None => {
                    d.conns.push(Some(conn));
                    d.conns.len() - 1
                }
            };
            if !d.shutdown.iter().any(|w| w.same_channel(shutdown)) {
                d.shutdown.push(shutdown.clone());
            }
            d.tick_on();
            ConnClock {
                list: d.list,
                slot,
                generation,
            }
        })
    }

    /// Runs `fut` (the read of the next request head) until it finishes or the wait ends
    /// ([`Woken`]). Finishing at its first poll costs one look at nothing.
    pub fn wait<F: Future>(&mut self, fut: F) -> Waited<'_, F> {
        Waited { fut, clock: self }
    }

    /// Applies `f` to this connection's slot (nothing when it is not on this thread).
    fn with<R>(&self, f: impl FnOnce(&mut Conn) -> R) -> Option<R> {
        DEADLINES.with(|d| {
            let mut d = d.borrow_mut();
            if d.list != self.list {
                return None;
            }
            match d.conns.get_mut(self.slot) {
                Some(Some(c)) if c.generation == self.generation => Some(f(c)),
                _ => None,
            }
        })
    }
}

impl Drop for ConnClock {
    fn drop(&mut self) {
        let _ = DEADLINES.try_with(|d| {
            let mut d = d.borrow_mut();
            if d.list != self.list {
                return;
            }
            let mine = matches!(
                d.conns.get(self.slot),
                Some(Some(c)) if c.generation == self.generation
            );
            if mine {
                d.conns[self.slot] = None;
                d.conns_free.push(self.slot);
            }
        });
    }
}

pin_project_lite::pin_project! {
    /// The future of [`ConnClock::wait`].
    pub struct Waited<'a, F> {
        #[pin]
        fut: F,
        clock: &'a ConnClock,
    }
}

impl<F: Future> Future for Waited<'_, F> {
    type Output = Result<F::Output, Woken>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            this.clock.with(|c| c.wait = Wait::Busy);
            return Poll::Ready(Ok(v));
        }
        let ended = this.clock.with(|c| match c.wait {
            Wait::Ended(why) => {
                c.wait = Wait::Busy;
                Some(why)
            }
            w => {
                if w == Wait::Busy {
                    c.wait = Wait::Since(None);
                }
                match &c.waker {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => c.waker = Some(cx.waker().clone()),
                }
                None
            }
        });
        match ended.flatten() {
            Some(why) => Poll::Ready(Err(why)),
            None => Poll::Pending,
        }
    }
}

/// Runs `fut` until `deadline` (up to one [`TICK`] later). Nothing is registered when `fut`
/// finishes at its first poll: a body or an answer already in the read buffer costs nothing.
pub fn timeout_at<F: Future>(deadline: Instant, fut: F) -> TimeoutAt<F> {
    TimeoutAt {
        fut,
        deadline,
        registration: None,
    }
}

pin_project_lite::pin_project! {
    /// The future of [`timeout_at`]. A struct rather than an `async fn`: an `async fn` keeps
    /// its argument and the pinned copy it polls apart, so every step awaited under a
    /// deadline took twice its size in the connection's state (issue 18: memory per stream).
    pub struct TimeoutAt<F> {
        #[pin]
        fut: F,
        deadline: Instant,
        registration: Option<Registration>,
    }
}

impl<F: Future> Future for TimeoutAt<F> {
    type Output = Result<F::Output, TimedOut>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        match this.registration {
            None => *this.registration = Some(Registration::new(*this.deadline, cx.waker())),
            Some(r) if r.fired(cx.waker()) => return Poll::Ready(Err(TimedOut)),
            Some(_) => {}
        }
        Poll::Pending
    }
}

#[cfg(test)]
fn live() -> usize {
    DEADLINES.with(|d| d.borrow().live)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_under_a_deadline_is_kept_once() {
        let step = async {
            let held = [7u8; 4096];
            std::future::pending::<()>().await;
            held[0]
        };
        let step_size = std::mem::size_of_val(&step);
        assert!(step_size >= 4096);
        let timed = timeout_at(Instant::now(), step);
        // The step, the deadline and the registration: not a second copy of the step.
        assert!(
            std::mem::size_of_val(&timed) <= step_size + 64,
            "{} for a step of {step_size}",
            std::mem::size_of_val(&timed)
        );
    }

    #[tokio::test]
    async fn a_ready_future_registers_nothing() {
        let before = live();
        let v = timeout_at(Instant::now() - Duration::from_secs(1), async { 7 }).await;
        assert_eq!(v, Ok(7));
        assert_eq!(live(), before);
    }

    #[tokio::test]
    async fn a_stalled_future_times_out_within_a_tick_of_its_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(120);
        let r = timeout_at(deadline, std::future::pending::<()>()).await;
        let took = start.elapsed();
        assert_eq!(r, Err(TimedOut));
        assert!(took >= Duration::from_millis(120), "fired early: {took:?}");
        assert!(
            took < Duration::from_millis(120) + TICK * 3,
            "fired late: {took:?}"
        );
        assert_eq!(live(), 0, "the fired registration is removed");
    }

    #[tokio::test]
    async fn a_future_that_finishes_in_time_is_not_cut_and_is_deregistered() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let r = timeout_at(deadline, async {
            tokio::time::sleep(Duration::from_millis(30)).await;
            "done"
        })
        .await;
        assert_eq!(r, Ok("done"));
        assert_eq!(live(), 0);
    }

    #[tokio::test]
    async fn many_waiters_fire_independently_and_slots_are_reused() {
        let now = Instant::now();
        let short = (0..20).map(|_| {
            timeout_at(
                now + Duration::from_millis(60),
                std::future::pending::<()>(),
            )
        });
        let long = (0..20).map(|i| {
            timeout_at(now + Duration::from_secs(5), async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                i
            })
        });
        let (s, l) = tokio::join!(
            futures::future::join_all(short),
            futures::future::join_all(long)
        );
        assert!(s.iter().all(|r| *r == Err(TimedOut)));
        assert_eq!(l, (0..20).map(Ok).collect::<Vec<_>>());
        assert_eq!(live(), 0);
        // Slots are reused: a new wave does not grow the list.
        let size = DEADLINES.with(|d| d.borrow().slots.len());
        let again = (0..20).map(|_| {
            timeout_at(
                Instant::now() + Duration::from_millis(10),
                std::future::pending::<()>(),
            )
        });
        futures::future::join_all(again).await;
        assert_eq!(DEADLINES.with(|d| d.borrow().slots.len()), size);
    }

    #[tokio::test]
    async fn the_ticker_stops_when_nothing_waits() {
        let _ = timeout_at(
            Instant::now() + Duration::from_millis(10),
            std::future::pending::<()>(),
        )
        .await;
        tokio::time::sleep(TICK * 3).await;
        assert!(!DEADLINES.with(|d| d.borrow().ticking));
    }

    #[test]
    fn a_connections_wait_by_tick() {
        use Wait::*;
        let t0 = Instant::now();
        let idle = Duration::from_secs(2);
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        for (wait, now, shutting_down, want) in [
            // Serving: no tick touches it, shutdown or not.
            (Busy, at(9_000), false, Busy),
            (Busy, at(9_000), true, Busy),
            // A new wait is timed from the first tick that sees it.
            (Since(None), at(9_000), false, Since(Some(at(9_000)))),
            (Since(Some(t0)), at(1_999), false, Since(Some(t0))),
            (Since(Some(t0)), at(2_000), false, Ended(Woken::Idle)),
            (Since(Some(t0)), at(60_000), false, Ended(Woken::Idle)),
            // Shutdown ends every wait, a new one included.
            (Since(None), at(0), true, Ended(Woken::Shutdown)),
            (Since(Some(t0)), at(10), true, Ended(Woken::Shutdown)),
            // An ended wait stays ended until the connection collects it.
            (Ended(Woken::Idle), at(10), true, Ended(Woken::Idle)),
            (
                Ended(Woken::Shutdown),
                at(10),
                false,
                Ended(Woken::Shutdown),
            ),
        ] {
            assert_eq!(
                on_tick(wait, now, idle, shutting_down),
                want,
                "{wait:?} at {:?} shutting down {shutting_down}",
                now - t0
            );
        }
    }

    fn conns() -> usize {
        DEADLINES.with(|d| {
            let d = d.borrow();
            d.conns.len() - d.conns_free.len()
        })
    }

    #[tokio::test]
    async fn a_connection_waiting_longer_than_its_idle_timeout_is_told_so() {
        let (_tx, rx) = watch::channel(false);
        let idle = Duration::from_millis(150);
        let mut clock = ConnClock::new(idle, &rx);
        // A head already there: nothing waits.
        assert_eq!(clock.wait(async { 7 }).await, Ok(7));
        // A head that comes in time.
        let r = clock
            .wait(async {
                tokio::time::sleep(Duration::from_millis(60)).await;
                8
            })
            .await;
        assert_eq!(r, Ok(8));
        // None comes: ended within two ticks after the idle timeout, not before it.
        let start = Instant::now();
        let r = clock.wait(std::future::pending::<()>()).await;
        let took = start.elapsed();
        assert_eq!(r, Err(Woken::Idle));
        assert!(took >= idle, "ended early: {took:?}");
        assert!(took < idle + TICK * 4, "ended late: {took:?}");
        // Each wait is timed on its own: the next one is not ended at once.
        let r = clock
            .wait(async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                9
            })
            .await;
        assert_eq!(r, Ok(9));
        assert_eq!(conns(), 1);
        drop(clock);
        assert_eq!(conns(), 0, "the slot goes with the connection");
    }

    #[tokio::test]
    async fn the_shutdown_signal_ends_a_wait_within_a_tick_or_two() {
        let (tx, rx) = watch::channel(false);
        let mut clock = ConnClock::new(Duration::from_secs(60), &rx);
        let signal = async {
            tokio::time::sleep(Duration::from_millis(80)).await;
            tx.send(true).unwrap();
            Instant::now()
        };
        let (r, signalled) = tokio::join!(clock.wait(std::future::pending::<()>()), signal);
        assert_eq!(r, Err(Woken::Shutdown));
        assert!(signalled.elapsed() < TICK * 3, "{:?}", signalled.elapsed());
        // A head that is there still wins over the signal.
        assert_eq!(clock.wait(async { 1 }).await, Ok(1));
    }

    #[tokio::test]
    async fn open_connections_keep_the_ticker_and_it_stops_after_them() {
        let (_tx, rx) = watch::channel(false);
        let clock = ConnClock::new(Duration::from_secs(60), &rx);
        tokio::time::sleep(TICK * 3).await;
        assert!(DEADLINES.with(|d| d.borrow().ticking));
        drop(clock);
        tokio::time::sleep(TICK * 3).await;
        assert!(!DEADLINES.with(|d| d.borrow().ticking));
    }
}
