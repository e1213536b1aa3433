//! Who waits for which payment. `POST /settle` answers once its payment
//! settles, so each call waits on its payment's state. The committer wakes
//! the waiters of the payments whose events a group commit made durable,
//! and no one else.
//!
//! ```text
//!  group commit (events of payments a, b, c) ──► durable ──► waiters of a, b, c woken ──► they re-read their payment
//! ```
//!
//! Before, every waiter re-read its payment at every commit that recorded
//! an event: waiters × commits reads a second, which grows with the square
//! of the load. A waiter arms its wake-up before it reads the payment, so a
//! commit after the read always wakes it; one before is in what it read.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
};

use tokio::sync::{Notify, futures::Notified};

use crate::domain::PaymentId;

/// The payments waited for, each with the [`Notify`] its waiters share.
#[derive(Debug, Default)]
pub struct PaymentWaiters {
    waiting: Mutex<HashMap<PaymentId, Arc<Notify>>>,
}

impl PaymentWaiters {
    /// Registers interest in `id` until the returned [`Waiter`] drops.
    pub fn wait_for(self: &Arc<Self>, id: PaymentId) -> Waiter {
        let notify = self.lock().entry(id).or_default().clone();
        Waiter { waiters: self.clone(), id, notify }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<PaymentId, Arc<Notify>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the waiters of each of `ids` (once they are durable): one
    /// lock, none of it when `ids` is empty.
    pub(crate) fn wake(&self, ids: impl IntoIterator<Item = PaymentId>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_none() {
            return;
        }
        let waiting = self.lock();
        if waiting.is_empty() {
            return;
        }
        for id in ids {
            if let Some(notify) = waiting.get(&id) {
                notify.notify_waiters();
            }
        }
    }
}

/// Interest in one payment: [`Waiter::notified`] completes when an event
/// of it is committed.
#[derive(Debug)]
pub struct Waiter {
    waiters: Arc<PaymentWaiters>,
    id: PaymentId,
    notify: Arc<Notify>,
}

impl Waiter {
    /// A wake-up, armed at once: call it before reading the payment, await
    /// it after.
    pub fn notified(&self) -> std::pin::Pin<Box<Notified<'_>>> {
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
    use alloy::primitives::B256;
    use futures::FutureExt;

    use super::*;

    #[test]
    fn only_the_named_payments_waiters_wake_and_the_last_one_leaves() {
        let waiters = Arc::new(PaymentWaiters::default());
        let (a, b) = (PaymentId(B256::repeat_byte(1)), PaymentId(B256::repeat_byte(2)));
        let (first, second, other) = (waiters.wait_for(a), waiters.wait_for(a), waiters.wait_for(b));
        let (first_woken, second_woken, other_woken) = (first.notified(), second.notified(), other.notified());
        waiters.wake([a]);
        assert!(first_woken.now_or_never().is_some());
        assert!(second_woken.now_or_never().is_some());
        assert!(other_woken.now_or_never().is_none(), "b was not named");

        // Armed before the wake: not missed, though polled after it.
        let armed = other.notified();
        waiters.wake([b]);
        assert!(armed.now_or_never().is_some());

        drop(first);
        assert_eq!(waiters.lock().len(), 2, "a still has a waiter");
        drop((second, other));
        assert!(waiters.lock().is_empty());
    }
}
