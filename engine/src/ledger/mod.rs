//! The ledger: where every accepted payment, queue entry, merchant and state
//! event is recorded durably.
//!
//! [`Ledger`] is the storage trait; [`RocksLedger`] is the production
//! implementation and [`MemoryLedger`] the test one. Both pass the same
//! conformance suite. All writes of a running engine go through one writer
//! thread (the pipeline's committer), which also numbers events; a
//! [`WriteBatch`] is applied atomically and, for RocksDB, fsync'd.

mod memory;
pub(crate) mod records;
mod rocks;

#[cfg(test)]
pub(crate) mod conformance;

use std::fmt;

pub use memory::MemoryLedger;
pub use rocks::{RocksLedger, RocksOptions};

use crate::{
    Result,
    domain::{ChannelRecord, IntentKey, Merchant, PaymentId, PaymentRecord, PendingKey, SettlementEvent, TxIntent},
};

/// One write of a [`WriteBatch`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    /// Insert or replace a payment.
    Payment(Box<PaymentRecord>),
    /// Add a payment to its merchant's settlement queue.
    Enqueue(PendingKey),
    /// Take a payment off the settlement queue.
    Dequeue(PendingKey),
    /// Append an event; its sequence must be the next one.
    Event(SettlementEvent),
    /// Insert or replace a merchant.
    Merchant(Merchant),
    /// Insert or replace a transaction intent.
    Intent(Box<TxIntent>),
    /// Delete a transaction intent that needs no more watching.
    ForgetIntent(IntentKey),
    /// Insert or replace a payment channel.
    Channel(Box<ChannelRecord>),
}

/// What [`Ledger::prune`] deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Payments deleted (settled or given up, past retention).
    pub payments: u64,
    /// Settlement events deleted.
    pub events: u64,
}

/// Writes applied together, atomically and durably.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    writes: Vec<Write>,
}

impl WriteBatch {
    /// An empty batch with room for `capacity` writes.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { writes: Vec::with_capacity(capacity) }
    }

    /// Adds `write`, applied after the writes before it.
    pub fn push(&mut self, write: Write) {
        self.writes.push(write);
    }

    /// The writes, in order.
    pub fn writes(&self) -> &[Write] {
        &self.writes
    }

    /// How many writes it holds.
    pub fn len(&self) -> usize {
        self.writes.len()
    }

    /// Whether it holds no write.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// Removes every write, keeping the allocation.
    pub fn clear(&mut self) {
        self.writes.clear();
    }
}

/// Durable storage of the engine's state.
pub trait Ledger: Send + Sync + fmt::Debug + 'static {
    /// Applies `batch` atomically; when this returns `Ok` the batch survives
    /// a crash of the process or the machine.
    fn commit(&self, batch: &WriteBatch) -> Result<()>;

    /// The payment with this id.
    fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>>;

    /// The payments of `ids` the ledger has, in one read.
    fn payments(&self, ids: &[PaymentId]) -> Result<Vec<PaymentRecord>> {
        ids.iter().filter_map(|id| self.payment(id).transpose()).collect()
    }

    /// Visits every payment, in id order.
    fn for_each_payment(&self, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()>;

    /// Visits every payment whose `validBefore` is `from` (Unix seconds) or
    /// later, in no particular order: what start-up needs of the history,
    /// read without going over the rest of it.
    fn for_each_payment_valid_from(&self, from: u64, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()> {
        self.for_each_payment(&mut |p| {
            if p.authorization.valid_before_secs() >= from {
                visit(p);
            }
        })
    }

    /// Deletes the payments no longer open (confirmed, failed, expired)
    /// whose `validBefore` is before `before` (Unix seconds), keeping their
    /// ids (see [`Ledger::pruned`]), and the events last updated before it,
    /// except the newest event (whose sequence the next one follows).
    fn prune(&self, before: u64) -> Result<Pruned>;

    /// The ids of `ids` whose payments [`Ledger::prune`] deleted: their
    /// nonces are spent, and a payment reusing one is refused.
    fn pruned(&self, ids: &[PaymentId]) -> Result<Vec<PaymentId>>;

    /// The settlement queue, ordered by merchant, then deadline.
    fn pending(&self) -> Result<Vec<PendingKey>>;

    /// The head of each merchant's settlement queue: its first
    /// `per_merchant` entries (earliest deadlines), ordered as
    /// [`Ledger::pending`]. What a settlement round can act on, without
    /// reading a backlog it cannot.
    fn pending_head(&self, per_merchant: usize) -> Result<Vec<PendingKey>> {
        let mut out = Vec::new();
        let (mut merchant, mut taken) = (None, 0);
        for key in self.pending()? {
            if merchant != Some(key.merchant_number) {
                (merchant, taken) = (Some(key.merchant_number), 0);
            }
            if taken < per_merchant {
                out.push(key);
                taken += 1;
            }
        }
        Ok(out)
    }

    /// Every merchant, ordered by id.
    fn merchants(&self) -> Result<Vec<Merchant>>;

    /// Up to `limit` events with a sequence above `after`, in order.
    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<SettlementEvent>>;

    /// Up to `limit` events of merchant `merchant_number` with a sequence
    /// above `after`, in order, read without going over other merchants'.
    fn merchant_events_after(&self, merchant_number: u32, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let mut out = Vec::new();
        let mut cursor = after;
        while out.len() < limit {
            let page = self.events_after(cursor, 1024)?;
            let Some(last) = page.last() else { break };
            cursor = last.sequence;
            out.extend(page.into_iter().filter(|e| e.merchant_number == merchant_number));
        }
        out.truncate(limit);
        Ok(out)
    }

    /// Up to `limit` events of merchant `merchant_number` with a sequence
    /// below `before`, newest first, read without going over other
    /// merchants'.
    fn merchant_events_before(&self, merchant_number: u32, before: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let mut out = self.merchant_events_after(merchant_number, 0, usize::MAX)?;
        out.retain(|e| e.sequence < before);
        out.reverse();
        out.truncate(limit);
        Ok(out)
    }

    /// The payments whose settlement is or was `tx` (any version of it, or
    /// the transaction that spent an authorization elsewhere), ordered by
    /// id, read by index.
    fn payments_by_transaction(&self, tx: &alloy::primitives::B256) -> Result<Vec<PaymentRecord>> {
        let mut out = Vec::new();
        self.for_each_payment(&mut |p| {
            if p.status.transaction == Some(*tx) {
                out.push(p);
            }
        })?;
        Ok(out)
    }

    /// The sequence of the last event, 0 when there is none.
    fn last_event_sequence(&self) -> Result<u64>;

    /// Every transaction intent not yet forgotten, ordered by chain, signer,
    /// then nonce.
    fn intents(&self) -> Result<Vec<TxIntent>>;

    /// The transaction intent at `key`, if not forgotten.
    fn intent(&self, key: &IntentKey) -> Result<Option<TxIntent>> {
        Ok(self.intents()?.into_iter().find(|i| i.key() == *key))
    }

    /// Every payment channel, ordered by id.
    fn channels(&self) -> Result<Vec<ChannelRecord>>;

    /// The channels of merchant `merchant_id`, ordered by id, read without
    /// going over other merchants'.
    fn merchant_channels(&self, merchant_id: &str) -> Result<Vec<ChannelRecord>> {
        Ok(self.channels()?.into_iter().filter(|c| c.merchant_id == merchant_id).collect())
    }

    /// One payment channel.
    fn channel(&self, id: &alloy::primitives::B256) -> Result<Option<ChannelRecord>>;
}
