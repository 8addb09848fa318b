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

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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
            if !d.ticking {
                d.ticking = true;
                tokio::spawn(ticker());
            }
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

/// Wakes the requests whose deadline passed, every [`TICK`], while any is waiting.
async fn ticker() {
    let mut wake = Vec::new();
    loop {
        tokio::time::sleep(TICK).await;
        let now = Instant::now();
        let stop = DEADLINES.with(|d| {
            let mut d = d.borrow_mut();
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
            if d.live == 0 {
                d.ticking = false;
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
}
