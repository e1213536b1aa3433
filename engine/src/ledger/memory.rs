//! [`MemoryLedger`]: the ledger in memory, for tests.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Mutex,
};

use super::{Ledger, Pruned, Write, WriteBatch};
use crate::{
    Result,
    domain::{ChannelRecord, IntentKey, Merchant, PaymentId, PaymentRecord, PendingKey, SettlementEvent, TxIntent},
};

/// A ledger that lives and dies with the process. Behaves like
/// [`super::RocksLedger`] in everything but durability.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<Tables>,
}

#[derive(Debug, Default)]
struct Tables {
    payments: BTreeMap<PaymentId, PaymentRecord>,
    pending: BTreeSet<PendingKey>,
    merchants: BTreeMap<String, Merchant>,
    events: BTreeMap<u64, SettlementEvent>,
    intents: BTreeMap<IntentKey, TxIntent>,
    channels: BTreeMap<alloy::primitives::B256, ChannelRecord>,
    pruned: BTreeSet<PaymentId>,
    /// (transaction, payment) for every transaction a payment's status named.
    by_tx: BTreeSet<(alloy::primitives::B256, PaymentId)>,
}

impl MemoryLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    fn tables(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Ledger for MemoryLedger {
    fn commit(&self, batch: &WriteBatch) -> Result<()> {
        let mut t = self.tables();
        for write in batch.writes() {
            match write {
                Write::Payment(p) => {
                    if let Some(tx) = p.status.transaction {
                        t.by_tx.insert((tx, p.id));
                    }
                    t.payments.insert(p.id, (**p).clone());
                }
                Write::Enqueue(key) => {
                    t.pending.insert(*key);
                }
                Write::Dequeue(key) => {
                    t.pending.remove(key);
                }
                Write::Event(e) => {
                    t.events.insert(e.sequence, e.clone());
                }
                Write::Merchant(m) => {
                    t.merchants.insert(m.id.clone(), m.clone());
                }
                Write::Intent(i) => {
                    t.intents.insert(i.key(), (**i).clone());
                }
                Write::ForgetIntent(key) => {
                    t.intents.remove(key);
                }
                Write::Channel(c) => {
                    t.channels.insert(c.channel.id, (**c).clone());
                }
            }
        }
        Ok(())
    }

    fn payment(&self, id: &PaymentId) -> Result<Option<PaymentRecord>> {
        Ok(self.tables().payments.get(id).cloned())
    }

    fn for_each_payment(&self, visit: &mut dyn FnMut(PaymentRecord)) -> Result<()> {
        let payments: Vec<_> = self.tables().payments.values().cloned().collect();
        payments.into_iter().for_each(visit);
        Ok(())
    }

    fn pending(&self) -> Result<Vec<PendingKey>> {
        Ok(self.tables().pending.iter().copied().collect())
    }

    fn prune(&self, before: u64) -> Result<Pruned> {
        let mut t = self.tables();
        let mut pruned = Pruned::default();
        let gone: Vec<PaymentId> = t
            .payments
            .values()
            .filter(|p| !p.status.state.is_open() && p.authorization.valid_before_secs() < before)
            .map(|p| p.id)
            .collect();
        for id in gone {
            if let Some(tx) = t.payments.get(&id).and_then(|p| p.status.transaction) {
                t.by_tx.remove(&(tx, id));
            }
            t.payments.remove(&id);
            t.pruned.insert(id);
            pruned.payments += 1;
        }
        // The oldest events, up to the first one as recent as `before`.
        let last = t.events.keys().next_back().copied();
        let old: Vec<u64> = t
            .events
            .iter()
            .take_while(|&(&sequence, e)| Some(sequence) != last && e.status.updated_at_ms / 1000 < before)
            .map(|(&sequence, _)| sequence)
            .collect();
        for sequence in &old {
            t.events.remove(sequence);
        }
        pruned.events = old.len() as u64;
        Ok(pruned)
    }

    fn pruned(&self, ids: &[PaymentId]) -> Result<Vec<PaymentId>> {
        let t = self.tables();
        Ok(ids.iter().copied().filter(|id| t.pruned.contains(id)).collect())
    }

    fn merchants(&self) -> Result<Vec<Merchant>> {
        Ok(self.tables().merchants.values().cloned().collect())
    }

    fn events_after(&self, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let Some(start) = after.checked_add(1) else { return Ok(Vec::new()) };
        let t = self.tables();
        Ok(t.events.range(start..).take(limit).map(|(_, e)| e.clone()).collect())
    }

    fn merchant_events_before(&self, merchant_number: u32, before: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let t = self.tables();
        let newest_first = t.events.range(..before).rev().map(|(_, e)| e);
        Ok(newest_first.filter(|e| e.merchant_number == merchant_number).take(limit).cloned().collect())
    }

    fn payments_by_transaction(&self, tx: &alloy::primitives::B256) -> Result<Vec<PaymentRecord>> {
        let t = self.tables();
        let ids = t.by_tx.range((*tx, PaymentId(alloy::primitives::B256::ZERO))..).take_while(|(t, _)| t == tx);
        Ok(ids.filter_map(|(_, id)| t.payments.get(id).cloned()).collect())
    }

    fn last_event_sequence(&self) -> Result<u64> {
        Ok(self.tables().events.keys().next_back().copied().unwrap_or(0))
    }

    fn intents(&self) -> Result<Vec<TxIntent>> {
        Ok(self.tables().intents.values().cloned().collect())
    }

    fn channels(&self) -> Result<Vec<ChannelRecord>> {
        Ok(self.tables().channels.values().cloned().collect())
    }

    fn channel(&self, id: &alloy::primitives::B256) -> Result<Option<ChannelRecord>> {
        Ok(self.tables().channels.get(id).cloned())
    }
}
