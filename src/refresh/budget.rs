//! The per-provider IdP budget: a cap on concurrent refreshes and on
//! refreshes per second, with callers who wait for a token served before
//! background (early and keep-alive) work.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// Who is waiting for a refresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    /// A caller waits for the result (on-demand, forced, registration).
    Urgent,
    /// Nobody waits yet (ahead-of-expiry, keep-alive).
    Background,
}

/// The limits of one provider.
#[derive(Debug, Clone, Copy)]
pub struct BudgetLimits {
    /// Refreshes in flight at once.
    pub max_concurrent: usize,
    /// Refreshes started per second.
    pub per_second: u32,
    /// Longest an urgent refresh waits for the budget before giving up.
    pub max_wait: Duration,
}

/// Raised when a caller starts waiting for background work: from then on it
/// competes for the budget as urgent work.
#[derive(Debug, Default)]
pub struct Escalation {
    raised: std::sync::atomic::AtomicBool,
    notify: Notify,
}

impl Escalation {
    /// Marks the work urgent and wakes its budget wait.
    pub fn raise(&self) {
        if !self.raised.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    /// Whether it was raised.
    pub fn is_raised(&self) -> bool {
        self.raised.load(Ordering::Acquire)
    }

    async fn raised(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_raised() {
                return;
            }
            notified.await;
        }
    }
}

/// A held slot of the budget; released on drop.
#[derive(Debug)]
pub struct BudgetPermit {
    _permit: OwnedSemaphorePermit,
}

/// The budget was not available within the allowed wait.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("refresh budget exhausted")]
pub struct BudgetExhausted;

/// Concurrency and rate limits of one provider.
#[derive(Debug)]
pub struct Budget {
    limits: BudgetLimits,
    permits: Arc<Semaphore>,
    rate: DefaultDirectRateLimiter,
    urgent_waiting: AtomicUsize,
    urgent_drained: Notify,
}

impl Budget {
    /// A budget with these limits (zeros are raised to one).
    pub fn new(limits: BudgetLimits) -> Self {
        let per_second = NonZeroU32::new(limits.per_second).unwrap_or(NonZeroU32::MIN);
        Self {
            limits,
            permits: Arc::new(Semaphore::new(limits.max_concurrent.max(1))),
            // No burst on top of the rate: GCRA's default burst of `n` would
            // let 2n refreshes start in the first second after a mass due date;
            // with a burst of one, no 1-second window holds more than n + 1.
            rate: RateLimiter::direct(Quota::per_second(per_second).allow_burst(NonZeroU32::MIN)),
            urgent_waiting: AtomicUsize::new(0),
            urgent_drained: Notify::new(),
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> BudgetLimits {
        self.limits
    }

    /// Waits for a slot. Urgent work gives up after `max_wait`; background work
    /// waits as long as it takes, and only while no urgent work is waiting.
    pub async fn acquire(&self, priority: Priority) -> Result<BudgetPermit, BudgetExhausted> {
        match priority {
            Priority::Urgent => {
                let _waiting = UrgentWaiting::enter(self);
                tokio::time::timeout(self.limits.max_wait, self.take())
                    .await
                    .map_err(|_| BudgetExhausted)?
            }
            Priority::Background => loop {
                self.wait_until_no_urgent().await;
                let permit = self.slot().await?;
                // An urgent caller that queued meanwhile goes first: hand the
                // slot over (the semaphore is FIFO) and wait again.
                if self.urgent_waiting.load(Ordering::Acquire) > 0 {
                    drop(permit);
                    continue;
                }
                self.rate.until_ready().await;
                return Ok(BudgetPermit { _permit: permit });
            },
        }
    }

    async fn wait_until_no_urgent(&self) {
        loop {
            let drained = self.urgent_drained.notified();
            if self.urgent_waiting.load(Ordering::Acquire) == 0 {
                return;
            }
            drained.await;
        }
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, BudgetExhausted> {
        self.permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BudgetExhausted)
    }

    async fn take(&self) -> Result<BudgetPermit, BudgetExhausted> {
        let permit = self.slot().await?;
        self.rate.until_ready().await;
        Ok(BudgetPermit { _permit: permit })
    }

    /// Like [`Budget::acquire`], but background work turns urgent as soon as
    /// `escalation` is raised (a caller joined it and now waits for it).
    pub async fn acquire_escalating(
        &self,
        priority: Priority,
        escalation: &Escalation,
    ) -> Result<BudgetPermit, BudgetExhausted> {
        if priority == Priority::Urgent || escalation.is_raised() {
            return self.acquire(Priority::Urgent).await;
        }
        tokio::select! {
            biased;
            () = escalation.raised() => self.acquire(Priority::Urgent).await,
            permit = self.acquire(Priority::Background) => permit,
        }
    }

    /// Waits for the rate limiter alone, for a second request inside a
    /// refresh that already holds a slot (the presentation once more after a
    /// lost answer): the IdP sees it like any other, so it counts against
    /// the rate too.
    pub async fn pace(&self) {
        self.rate.until_ready().await;
    }

    /// Refreshes in flight now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_concurrent.max(1) - self.permits.available_permits()
    }
}

/// Counts an urgent waiter for as long as it waits (also when its future is dropped).
struct UrgentWaiting<'a>(&'a Budget);

impl<'a> UrgentWaiting<'a> {
    fn enter(budget: &'a Budget) -> Self {
        budget.urgent_waiting.fetch_add(1, Ordering::AcqRel);
        Self(budget)
    }
}

impl Drop for UrgentWaiting<'_> {
    fn drop(&mut self) {
        if self.0.urgent_waiting.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.urgent_drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(max_concurrent: usize) -> Arc<Budget> {
        Arc::new(Budget::new(BudgetLimits {
            max_concurrent,
            per_second: 10_000,
            max_wait: Duration::from_millis(200),
        }))
    }

    #[tokio::test]
    async fn no_burst_above_the_rate() {
        // 20/s: within 300 ms at most 1 + 0.3 × 20 = 7 refreshes may start
        // (the default GCRA burst would let 20 through at once).
        let b = Arc::new(Budget::new(BudgetLimits {
            max_concurrent: 100,
            per_second: 20,
            max_wait: Duration::from_secs(5),
        }));
        let started = tokio::time::Instant::now();
        let mut granted = 0;
        let _ = tokio::time::timeout(Duration::from_millis(300), async {
            loop {
                drop(b.acquire(Priority::Background).await.unwrap());
                granted += 1;
            }
        })
        .await;
        let elapsed = started.elapsed().as_secs_f64();
        assert!(
            f64::from(granted) <= 1.0 + elapsed * 20.0 + 1.0,
            "{granted} permits in {elapsed:.3} s at 20/s"
        );
        assert!(granted >= 1);
    }

    #[tokio::test]
    async fn caps_concurrency() {
        let b = budget(2);
        let p1 = b.acquire(Priority::Urgent).await.unwrap();
        let _p2 = b.acquire(Priority::Urgent).await.unwrap();
        assert_eq!(b.in_flight(), 2);
        assert!(
            b.acquire(Priority::Urgent).await.is_err(),
            "third must time out"
        );
        drop(p1);
        assert!(b.acquire(Priority::Urgent).await.is_ok());
    }

    #[tokio::test]
    async fn urgent_work_goes_before_background_work() {
        let b = budget(1);
        let held = b.acquire(Priority::Urgent).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let bg = {
            let (b, tx) = (b.clone(), tx.clone());
            tokio::spawn(async move {
                let _p = b.acquire(Priority::Background).await.unwrap();
                tx.send("background").unwrap();
            })
        };
        tokio::task::yield_now().await;
        let urgent = {
            let (b, tx) = (b.clone(), tx.clone());
            tokio::spawn(async move {
                let _p = b.acquire(Priority::Urgent).await.unwrap();
                tx.send("urgent").unwrap();
            })
        };
        // Let both queue up, then free the slot.
        while b.urgent_waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        drop(held);
        assert_eq!(rx.recv().await, Some("urgent"));
        assert_eq!(rx.recv().await, Some("background"));
        urgent.await.unwrap();
        bg.await.unwrap();
    }

    #[tokio::test]
    async fn background_work_that_a_caller_joins_turns_urgent() {
        let b = budget(1);
        let held = b.acquire(Priority::Urgent).await.unwrap();
        let escalation = Arc::new(Escalation::default());
        let bg = {
            let (b, e) = (b.clone(), escalation.clone());
            tokio::spawn(async move {
                b.acquire_escalating(Priority::Background, &e)
                    .await
                    .map(drop)
            })
        };
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            b.urgent_waiting.load(Ordering::Acquire),
            0,
            "still background"
        );
        escalation.raise();
        while b.urgent_waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // Now it holds back other background work and waits with the urgent bound.
        drop(held);
        bg.await.unwrap().expect("the escalated work gets the slot");
        assert_eq!(b.urgent_waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn rate_limit_spaces_out_starts() {
        let b = Budget::new(BudgetLimits {
            max_concurrent: 10,
            per_second: 1,
            max_wait: Duration::from_millis(100),
        });
        assert!(b.acquire(Priority::Urgent).await.is_ok());
        // The second start within the same second exceeds the quota.
        assert!(b.acquire(Priority::Urgent).await.is_err());
    }
}
