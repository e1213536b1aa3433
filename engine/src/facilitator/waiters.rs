//! Who waits for which payment. `POST /settle` answers once its payment
//! settles, so each call waits on its payment's state. A task follows the
//! ledger's events and wakes only the waiters of the payments they name.
//! Before it, every waiter re-read its payment at every commit that
//! recorded an event: waiters × commits reads a second, which grows with
//! the square of the load.
//!
//! ```text
//!  commit ──► event sequence ──► follower: events since its cursor (skipped when nobody waits)
//!                                   └─► for each event: its payment's waiters woken ──► they re-read the payment
//! ```
//!
//! A waiter arms its wake-up before it reads the payment, so an event
//! committed after the read always wakes it; one committed before is in
//! what it read.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
};

use tokio::sync::{Notify, futures::Notified, watch};

use crate::{domain::PaymentId, engine::Engine, ledger::Ledger};

/// Events the follower reads at a time.
const EVENTS_PER_READ: usize = 4_096;

/// The payments waited for, each with the [`Notify`] its waiters share.
#[derive(Debug, Default)]
pub(super) struct PaymentWaiters {
    waiting: Mutex<HashMap<PaymentId, Arc<Notify>>>,
}

impl PaymentWaiters {
    /// Starts following `engine`'s events; the follower stops with the
    /// engine's pipeline (it holds the ledger, not the engine, whose drop
    /// joins the pipeline). Must be called inside a tokio runtime.
    pub(super) fn start(engine: &Engine) -> Arc<Self> {
        let waiters = Arc::new(Self::default());
        tokio::spawn(waiters.clone().follow(engine.event_sequence(), engine.ledger()));
        waiters
    }

    /// Registers interest in `id` until the returned [`Waiter`] drops.
    pub(super) fn wait_for(self: &Arc<Self>, id: PaymentId) -> Waiter {
        let notify = self.lock().entry(id).or_default().clone();
        Waiter { waiters: self.clone(), id, notify }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PaymentId, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the waiters of each of `ids`.
    fn wake(&self, ids: impl IntoIterator<Item = PaymentId>) {
        let waiting = self.lock();
        for id in ids {
            if let Some(notify) = waiting.get(&id) {
                notify.notify_waiters();
            }
        }
    }

    /// Wakes every waiter, to re-read: when events could not be read.
    fn wake_all(&self) {
        self.lock().values().for_each(|n| n.notify_waiters());
    }

    async fn follow(self: Arc<Self>, mut sequence: watch::Receiver<u64>, ledger: Arc<dyn Ledger>) {
        let mut cursor = *sequence.borrow_and_update();
        while sequence.changed().await.is_ok() {
            let latest = *sequence.borrow_and_update();
            if self.lock().is_empty() {
                // A waiter registered from now on reads its payment after
                // these events.
                cursor = latest;
                continue;
            }
            while cursor < latest {
                let ledger = ledger.clone();
                let read = tokio::task::spawn_blocking(move || ledger.events_after(cursor, EVENTS_PER_READ)).await;
                match read.unwrap_or_else(|_| Err(crate::Error::PipelineStopped)) {
                    Ok(events) => {
                        let Some(last) = events.last() else { break };
                        cursor = last.sequence;
                        self.wake(events.iter().map(|e| e.payment_id));
                    }
                    Err(err) => {
                        tracing::warn!(%err, "reading settlement events failed; every /settle waiter re-reads");
                        self.wake_all();
                        cursor = latest;
                    }
                }
            }
        }
    }
}

/// Interest in one payment: [`Waiter::notified`] completes when an event
/// of it is committed.
#[derive(Debug)]
pub(super) struct Waiter {
    waiters: Arc<PaymentWaiters>,
    id: PaymentId,
    notify: Arc<Notify>,
}

impl Waiter {
    /// A wake-up, armed at once: call it before reading the payment, await
    /// it after.
    pub(super) fn notified(&self) -> std::pin::Pin<Box<Notified<'_>>> {
        let mut notified = Box::pin(self.notify.notified());
        notified.as_mut().enable();
        notified
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut waiting = self.waiters.lock();
        // The map's and this one: the last waiter of the payment.
        if Arc::strong_count(&self.notify) == 2 {
            waiting.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Whether `wake_up` completes within 200 ms: far below the 1 s safety
    /// net of `/settle`.
    async fn soon(wake_up: impl Future<Output = ()>) -> Result<(), tokio::time::error::Elapsed> {
        tokio::time::timeout(Duration::from_millis(200), wake_up).await
    }

    #[tokio::test]
    async fn only_the_named_payments_waiters_wake_and_the_last_one_leaves() {
        let waiters = Arc::new(PaymentWaiters::default());
        let (a, b) =
            (PaymentId(alloy::primitives::B256::repeat_byte(1)), PaymentId(alloy::primitives::B256::repeat_byte(2)));
        let (first, second, other) = (waiters.wait_for(a), waiters.wait_for(a), waiters.wait_for(b));
        let (first_woken, second_woken, other_woken) = (first.notified(), second.notified(), other.notified());
        waiters.wake([a]);
        assert!(soon(first_woken).await.is_ok());
        assert!(soon(second_woken).await.is_ok());
        assert!(soon(other_woken).await.is_err(), "b was not named");

        // Armed before the event: not missed even if awaited after it.
        let armed = other.notified();
        waiters.wake([b]);
        assert!(soon(armed).await.is_ok());

        drop(first);
        assert_eq!(waiters.lock().len(), 2, "a still has a waiter");
        drop((second, other));
        assert!(waiters.lock().is_empty());
    }

    #[tokio::test]
    async fn the_follower_wakes_the_waiters_of_committed_events() {
        use crate::ledger::{MemoryLedger, Write, WriteBatch, conformance};
        let ledger = Arc::new(MemoryLedger::new());
        let (sequence, events) = watch::channel(0);
        let waiters = Arc::new(PaymentWaiters::default());
        tokio::spawn(waiters.clone().follow(events, ledger.clone()));
        let (mine, theirs) = (conformance::sample_payment(1, 100), conformance::sample_payment(2, 100));
        let waiter = waiters.wait_for(mine.id);
        let commit = |seq: u64, p: &crate::domain::PaymentRecord| {
            let mut batch = WriteBatch::default();
            batch.push(Write::Event(conformance::event(seq, p)));
            ledger.commit(&batch).unwrap();
            sequence.send_replace(seq);
        };

        let woken = waiter.notified();
        commit(1, &theirs);
        assert!(soon(woken).await.is_err(), "another payment's event");
        let woken = waiter.notified();
        commit(2, &theirs);
        commit(3, &mine);
        assert!(soon(woken).await.is_ok());

        // With nobody waiting the follower skips the events; a new waiter
        // is still woken by the next one of its payment.
        drop(waiter);
        commit(4, &mine);
        tokio::time::sleep(Duration::from_millis(50)).await;
        let waiter = waiters.wait_for(mine.id);
        let woken = waiter.notified();
        commit(5, &mine);
        assert!(soon(woken).await.is_ok());
    }
}
