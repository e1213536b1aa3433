//! Stage 3: the group-commit writer, the ledger's one writer.
//!
//! It takes everything queued for it (up to `max_group` items), writes it as
//! one `WriteBatch` with fsync, and only then sends the answers. Under load
//! the queue fills while an fsync runs, so groups grow by themselves and the
//! cost of a sync is shared by many payments.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::Instant,
};

use alloy::primitives::{Address, B256, U256};
use crossbeam::channel::{Receiver, Sender};
use tokio::sync::{oneshot, watch};

use super::{
    ChangedChannels, IntentChange, PaymentWaiters, SubmitOutcome, Transition,
    messages::{ChannelReply, CommitItem, ReservationChange, ShardMsg},
    pending_gauge,
    verifier::shard_of,
};
use crate::{
    Error, Result,
    domain::{
        BalanceKey, ChannelRecord, Clock, IdempotencyKey, IntentKey, PaymentId, PaymentRecord, PaymentStatus,
        PendingKey, SettlementEvent,
    },
    ledger::{Ledger, Write, WriteBatch},
    reason::{Reason, Rejection},
};

/// What to do once a group is durable (or failed).
enum Done {
    Accepted {
        id: PaymentId,
        payer: Address,
        status: PaymentStatus,
        strategy: &'static str,
        shard: usize,
        reservation: BalanceKey,
        value: U256,
        reply: oneshot::Sender<SubmitOutcome>,
    },
    Reply(SubmitOutcome, oneshot::Sender<SubmitOutcome>),
    /// The answer to a payment the ledger has already, owed, read from
    /// the ledger: true even if an earlier write of it was reported failed.
    Recorded(PaymentId, SubmitOutcome, oneshot::Sender<SubmitOutcome>),
    /// A payment not written: its idempotency key names another payment.
    Refused {
        id: PaymentId,
        shard: usize,
        reservation: BalanceKey,
        value: U256,
        outcome: SubmitOutcome,
        reply: oneshot::Sender<SubmitOutcome>,
    },
    Merchant(oneshot::Sender<Result<()>>),
    /// A channel write; a failed request's `previous` goes back to its shard.
    ChannelWrite(ChannelReply, Option<(Box<ChannelRecord>, usize)>),
    Settlement {
        settled: Vec<Settled>,
        reply: oneshot::Sender<Result<()>>,
    },
    Channel {
        previous: Box<ChannelRecord>,
        shard: usize,
        outcome: SubmitOutcome,
        reply: oneshot::Sender<SubmitOutcome>,
    },
}

/// A recorded state change, to pass on to the payer's shard once durable.
struct Settled {
    id: PaymentId,
    status: PaymentStatus,
    /// Released when the payment is no longer owed; taken again when a
    /// reorg undoes its settlement.
    reservation: Option<ReservationChange>,
    /// Its strategy, when the change puts it back on the settlement queue.
    requeue: Option<&'static str>,
    /// Its strategy, when the change takes it off the settlement queue.
    dequeued: Option<&'static str>,
    shard: usize,
}

pub(crate) struct Committer {
    ledger: Arc<dyn Ledger>,
    last_sequence: u64,
    events: watch::Sender<u64>,
    max_group: usize,
    shards: Vec<Sender<ShardMsg>>,
    /// Settlement queue entries per strategy, for the depth gauges. Counted
    /// from each payment's own transitions: the queue itself is in the
    /// ledger only, however long it grows.
    depths: HashMap<&'static str, usize>,
    /// Payments whose group commit failed (or that were refused), and when.
    /// A DUPLICATE of one that a shard answered before it learned of the
    /// revert must not be sent. Kept a minute: the shard hears far sooner.
    reverted: HashMap<PaymentId, Instant>,
    changed_channels: Arc<ChangedChannels>,
    payment_waiters: Arc<PaymentWaiters>,
    /// The payment each merchant's recent idempotency keys name, and until
    /// when (unix seconds): a key names one payment only. Keys go with their
    /// payment's replay window.
    keys: HashMap<(u32, IdempotencyKey), (PaymentId, u64)>,
    /// Channels a failed write sent back to their recorded state, until the
    /// shard says it applied that: items of theirs until then were built on
    /// the failed state and are refused, never written.
    reverting: std::collections::HashSet<B256>,
    /// A failed write's events may be on disk, and reading the last one
    /// back failed: the next number is unknown until it is read.
    numbering_unsure: bool,
    /// Prune expired keys once there are this many.
    prune_keys_at: usize,
    retention_secs: u64,
    clock: Clock,
}

impl Committer {
    /// How long the fate of a failed group commit is asked after (the
    /// committer waits, and so does everything behind it).
    const FATE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

    pub(crate) fn new(
        ledger: Arc<dyn Ledger>,
        last_sequence: u64,
        events: watch::Sender<u64>,
        max_group: usize,
        shards: Vec<Sender<ShardMsg>>,
    ) -> Self {
        Self {
            ledger,
            last_sequence,
            events,
            max_group: max_group.max(1),
            shards,
            depths: HashMap::new(),
            reverted: HashMap::new(),
            changed_channels: Arc::default(),
            payment_waiters: Arc::default(),
            keys: HashMap::new(),
            reverting: std::collections::HashSet::new(),
            numbering_unsure: false,
            prune_keys_at: Self::MIN_PRUNE_KEYS_AT,
            retention_secs: 0,
            clock: Clock::system(),
        }
    }

    const MIN_PRUNE_KEYS_AT: usize = 1024;

    /// Reads the time from `clock`.
    pub(crate) fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Keeps idempotency keys until `validBefore` + `retention_secs`.
    pub(crate) const fn with_key_retention(mut self, retention_secs: u64) -> Self {
        self.retention_secs = retention_secs;
        self
    }

    /// Remembers the idempotency key of a payment read from the ledger at start.
    pub(crate) fn restore_key(&mut self, record: &PaymentRecord, now: u64) {
        if let Some(key) = record.idempotency {
            let until = record.authorization.valid_before_secs().saturating_add(self.retention_secs);
            if until >= now {
                self.keys.insert((record.merchant_number, key), (record.id, until));
            }
        }
    }

    /// Claims `record`'s idempotency key for it; `false` if the key names
    /// another payment of the merchant still in its window.
    fn claim_key(&mut self, record: &PaymentRecord, now: u64, claimed: &mut Vec<(u32, IdempotencyKey)>) -> bool {
        let Some(key) = record.idempotency else { return true };
        let slot = (record.merchant_number, key);
        if let Some(&(other, until)) = self.keys.get(&slot)
            && other != record.id
            && until >= now
        {
            return false;
        }
        if self.keys.len() >= self.prune_keys_at {
            self.keys.retain(|_, (_, until)| *until >= now);
            self.prune_keys_at = (self.keys.len() * 2).max(Self::MIN_PRUNE_KEYS_AT);
        }
        let until = record.authorization.valid_before_secs().saturating_add(self.retention_secs);
        self.keys.insert(slot, (record.id, until));
        claimed.push(slot);
        true
    }

    /// Whom the committer wakes when it makes a payment's event durable.
    pub(crate) fn payment_waiters(&self) -> Arc<PaymentWaiters> {
        self.payment_waiters.clone()
    }

    /// Where the committer reports the channels it made durable.
    pub(crate) fn changed_channels(&self) -> Arc<ChangedChannels> {
        self.changed_channels.clone()
    }

    /// Loads the settlement queue from the ledger.
    pub(crate) fn restore_pending(&mut self, pending: &[PendingKey], ledger: &Arc<dyn Ledger>) -> Result<()> {
        for key in pending {
            let strategy = ledger.payment(&key.id)?.map_or("unknown", |p| p.policy.name());
            self.enqueue(strategy);
        }
        self.publish_depths();
        Ok(())
    }

    fn enqueue(&mut self, strategy: &'static str) {
        *self.depths.entry(strategy).or_default() += 1;
    }

    fn dequeue(&mut self, strategy: &'static str) {
        if let Some(depth) = self.depths.get_mut(strategy) {
            *depth = depth.saturating_sub(1);
        }
    }

    /// The writes of a settlement update, or why it cannot be applied (then
    /// nothing of it is written).
    fn settlement_writes(
        &self,
        intents: Vec<IntentChange>,
        transitions: Vec<Transition>,
        sequence: &mut u64,
        batch: &mut WriteBatch,
        group_intents: &mut HashMap<IntentKey, Option<Option<B256>>>,
    ) -> Result<Vec<Settled>> {
        let mut records = Vec::with_capacity(transitions.len());
        for t in transitions {
            let record = self.ledger.payment(&t.id)?.ok_or(Error::UnknownPayment(t.id))?;
            records.push((record, t.status));
        }
        // One intent per signer nonce: a recorded one (in the ledger, or
        // earlier in this group) is replaced only by a version of itself (a
        // fee bump, its conclusion, a reorg: the same first transaction).
        let mut seen = HashMap::new();
        for change in &intents {
            match change {
                IntentChange::Forget(key) => {
                    seen.insert(*key, None);
                }
                IntentChange::Record(intent) => {
                    let key = intent.key();
                    let existing = match seen.get(&key).or_else(|| group_intents.get(&key)) {
                        Some(recorded) => *recorded,
                        None => self
                            .ledger
                            .intent(&key)?
                            .filter(|i| !matches!(i.state, crate::domain::IntentState::Abandoned))
                            .map(|i| i.tx_hashes.first().copied()),
                    };
                    let first = intent.tx_hashes.first().copied();
                    if existing.is_some_and(|recorded| recorded != first) {
                        return Err(Error::IntentConflict(key));
                    }
                    seen.insert(key, Some(first));
                }
            }
        }
        group_intents.extend(seen);
        for change in intents {
            batch.push(match change {
                IntentChange::Record(intent) => Write::Intent(Box::new(intent)),
                IntentChange::Forget(key) => Write::ForgetIntent(key),
            });
        }
        let mut settled = Vec::with_capacity(records.len());
        for (mut record, status) in records {
            *sequence += 1;
            let payer = record.authorization.from;
            let pending = PendingKey {
                merchant_number: record.merchant_number,
                deadline: record.authorization.valid_before_secs(),
                id: record.id,
            };
            let key = BalanceKey { chain_id: record.chain_id, token: record.asset, owner: payer };
            let value = record.authorization.value;
            let (reservation, requeue, dequeued) = match (record.status.state.is_open(), status.state.is_open()) {
                (true, false) => (Some(ReservationChange::Release(key, value)), None, Some(record.policy.name())),
                (false, true) => (Some(ReservationChange::Reserve(key, value)), Some(record.policy.name()), None),
                _ => (None, None, None),
            };
            if status.state.is_open() {
                // Idempotent for a payment still queued.
                batch.push(Write::Enqueue(pending));
            } else {
                batch.push(Write::Dequeue(pending));
            }
            batch.push(Write::Event(SettlementEvent {
                sequence: *sequence,
                merchant_number: record.merchant_number,
                payment_id: record.id,
                status: status.clone(),
                channel: None,
            }));
            record.status = status.clone();
            batch.push(Write::Payment(Box::new(record)));
            settled.push(Settled {
                id: pending.id,
                status,
                reservation,
                requeue,
                dequeued,
                shard: shard_of(payer, self.shards.len()),
            });
        }
        Ok(settled)
    }

    /// Payment `id` was not recorded: its shard forgets it, and a DUPLICATE
    /// of it answered before the shard heard is not sent.
    fn refuse(&mut self, id: PaymentId, shard: usize, reservation: BalanceKey, value: U256) {
        if self.reverted.len() >= 4096 {
            self.reverted.retain(|_, at| at.elapsed() < std::time::Duration::from_secs(60));
        }
        self.reverted.insert(id, Instant::now());
        let _ = self.shards[shard].send(ShardMsg::Revert { id, reservation, value });
    }

    /// Whether `batch`, reported failed, is on disk all the same; `None`
    /// while the ledger cannot be read. A batch is written whole or not at
    /// all, and only this thread writes events: if the group's last event
    /// reads back as written, at its number, the whole group is there. A
    /// group without events is there if each of its records reads back as
    /// last written (then the ledger is as if it had been, at the least).
    fn on_disk(&self, batch: &WriteBatch) -> Option<bool> {
        let last_event = batch.writes().iter().rev().find_map(|w| if let Write::Event(e) = w { Some(e) } else { None });
        if let Some(event) = last_event {
            let read = self.ledger.events_after(event.sequence.saturating_sub(1), 1).ok()?;
            return Some(read.first() == Some(event));
        }
        // What each record must read back as: its last write in the batch.
        let mut channels = HashMap::new();
        let mut intents = HashMap::new();
        let mut merchants = HashMap::new();
        for write in batch.writes() {
            match write {
                Write::Channel(record) => {
                    channels.insert(record.channel.id, record);
                }
                Write::Intent(intent) => {
                    intents.insert(intent.key(), Some(&**intent));
                }
                Write::ForgetIntent(key) => {
                    intents.insert(*key, None);
                }
                Write::Merchant(m) => {
                    merchants.insert(m.id.as_str(), m);
                }
                // Payments and the queue are written with events.
                Write::Payment(_) | Write::Enqueue(_) | Write::Dequeue(_) | Write::Event(_) => return Some(false),
            }
        }
        for (id, record) in channels {
            if self.ledger.channel(&id).ok()?.as_ref() != Some(record) {
                return Some(false);
            }
        }
        for (key, intent) in intents {
            if self.ledger.intent(&key).ok()?.as_ref() != intent {
                return Some(false);
            }
        }
        if !merchants.is_empty() {
            let recorded = self.ledger.merchants().ok()?;
            return Some(merchants.values().all(|m| recorded.contains(m)));
        }
        Some(true)
    }

    /// [`Self::on_disk`], asked again for a while when the ledger cannot
    /// be read at once (a ledger reopening after a failed write replays
    /// its log first). Still unknown after that, the group counts as not
    /// written: nothing of it was acknowledged, and a payment of it that
    /// did land is answered from the ledger when it is sent again.
    fn landed(&self, batch: &WriteBatch) -> bool {
        let deadline = Instant::now() + Self::FATE_WAIT;
        loop {
            match self.on_disk(batch) {
                Some(landed) => return landed,
                None if Instant::now() >= deadline => {
                    tracing::error!("whether a failed group commit reached the disk cannot be read; it counts as not");
                    return false;
                }
                None => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }

    /// What a client is told when the ledger could not be read (`e`, logged).
    fn unreadable(e: &Error) -> String {
        tracing::warn!(%e, "the ledger could not be read");
        "the ledger could not be read just now; retry".into()
    }

    /// Reads the last recorded event's number, which a write reported
    /// failed may have moved: numbering goes on after it.
    fn read_numbering(&mut self) -> Result<()> {
        let last = self.ledger.last_event_sequence()?;
        if last > self.last_sequence {
            tracing::warn!(last, "events of a failed commit were recorded after all");
            self.last_sequence = last;
            self.events.send_replace(last);
        }
        self.numbering_unsure = false;
        Ok(())
    }

    /// A write of `previous`'s channel failed: its shard goes back to
    /// `previous`, unless an earlier write of the group already sent it
    /// back (the first holds the recorded state; later ones were built on
    /// top), and the channel's items are refused until the shard says so.
    fn revert_channel(&mut self, previous: Box<ChannelRecord>, shard: usize) {
        if self.reverting.insert(previous.channel.id) {
            let _ = self.shards[shard].send(ShardMsg::ChannelRevert { record: previous });
        }
    }

    fn publish_depths(&self) {
        for (strategy, depth) in &self.depths {
            pending_gauge(strategy, *depth);
        }
    }

    /// Commits groups from `rx` (the shards' payments and channel writes;
    /// bounded) and `control` (merchant writes and settlement progress from
    /// async callers; unbounded, so that they never block a runtime thread)
    /// until both are closed. The committer itself never waits on a shard:
    /// its messages to them go to their unbounded control queues, so a
    /// stalled commit cannot close a cycle of full queues.
    pub(crate) fn run(mut self, rx: &Receiver<CommitItem>, control: &Receiver<CommitItem>) {
        let mut group = Vec::with_capacity(self.max_group);
        let mut batch = WriteBatch::with_capacity(self.max_group * 3);
        let mut done = Vec::with_capacity(self.max_group);
        let (mut rx, mut control) = (rx.clone(), control.clone());
        let mut open = 2;
        loop {
            let first = crossbeam::channel::select_biased! {
                recv(control) -> item => item.map_err(|_| true),
                recv(rx) -> item => item.map_err(|_| false),
            };
            let first = match first {
                Ok(item) => item,
                // One side closed: wait on the other alone, until both are.
                Err(control_closed) => {
                    if control_closed {
                        control = crossbeam::channel::never();
                    } else {
                        rx = crossbeam::channel::never();
                    }
                    open -= 1;
                    if open == 0 {
                        return;
                    }
                    continue;
                }
            };
            group.push(first);
            while group.len() < self.max_group {
                match control.try_recv().or_else(|_| rx.try_recv()) {
                    Ok(item) => group.push(item),
                    Err(_) => break,
                }
            }
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "stage" => "commit").set(rx.len() as f64);
            self.commit_group(&mut group, &mut batch, &mut done);
        }
    }

    fn commit_group(&mut self, group: &mut Vec<CommitItem>, batch: &mut WriteBatch, done: &mut Vec<Done>) {
        // After a failed write whose events could not be read back, the
        // next event number is not known: nothing is written until it is.
        let numbering = if self.numbering_unsure { self.read_numbering() } else { Ok(()) };
        let mut attempted = false;
        let first_sequence = self.last_sequence;
        let mut sequence = first_sequence;
        let now = self.clock.now_secs();
        let mut claimed_keys = Vec::new();
        let mut group_intents = HashMap::new();
        // A new payment the ledger already has (its replay entry let go, a
        // write thought failed that was recorded after all) is never
        // written over: one read for the group.
        let new: Vec<PaymentId> = group
            .iter()
            .filter_map(|item| if let CommitItem::Payment { record, .. } = item { Some(record.id) } else { None })
            .collect();
        let recorded: Result<HashMap<PaymentId, PaymentRecord>> = if new.is_empty() {
            Ok(HashMap::new())
        } else {
            self.ledger.payments(&new).map(|found| found.into_iter().map(|p| (p.id, p)).collect())
        };
        // Nor is one whose settled record retention deleted: its nonce is spent.
        let pruned: Result<HashSet<PaymentId>> = if new.is_empty() {
            Ok(HashSet::new())
        } else {
            self.ledger.pruned(&new).map(|ids| ids.into_iter().collect())
        };
        for item in group.drain(..) {
            match item {
                CommitItem::Payment { record, shard, reply, .. }
                    if pruned.as_ref().map_or(true, |p| p.contains(&record.id)) =>
                {
                    let (id, payer) = (record.id, record.authorization.from);
                    let outcome = match &pruned {
                        Ok(_) => SubmitOutcome::Rejected {
                            id: Some(id),
                            payer: Some(payer),
                            rejection: Rejection::new(
                                Reason::NonceAlreadyUsed,
                                "this nonce was spent by a payment settled long ago",
                            ),
                        },
                        Err(e) => SubmitOutcome::Unavailable(Self::unreadable(e)),
                    };
                    let (reservation, value) = (
                        BalanceKey { chain_id: record.chain_id, token: record.asset, owner: payer },
                        record.authorization.value,
                    );
                    done.push(Done::Refused { id, shard, reservation, value, outcome, reply });
                }
                CommitItem::Payment { record, shard, reply, .. }
                    if recorded.as_ref().map_or(true, |r| r.contains_key(&record.id)) =>
                {
                    let (id, payer) = (record.id, record.authorization.from);
                    let reservation = record.balance_key();
                    let value = record.authorization.value;
                    match recorded.as_ref().map(|r| &r[&id]) {
                        // Another payment with this nonce: as the shard
                        // answers it (nothing of the other is shown).
                        Ok(existing) if existing.digest != record.digest => {
                            let outcome = SubmitOutcome::Rejected {
                                id: Some(id),
                                payer: Some(payer),
                                rejection: Rejection::new(
                                    Reason::NonceAlreadyUsed,
                                    format!("nonce {} of {payer} was already used", record.authorization.nonce),
                                ),
                            };
                            done.push(Done::Refused { id, shard, reservation, value, outcome, reply });
                        }
                        Ok(existing) => {
                            // The same payment: a retry only with the key
                            // the original carried, from its merchant.
                            let retry = record.idempotency.is_some()
                                && record.idempotency == existing.idempotency
                                && record.merchant_number == existing.merchant_number;
                            let status = existing.status.clone();
                            let outcome = SubmitOutcome::Duplicate { id, payer, status, retry };
                            // Its key names it again (a failed group that
                            // landed gave it up): another payment with the
                            // key is refused, not charged a second time.
                            self.restore_key(existing, now);
                            if existing.status.state.is_open() {
                                // Owed: the shard keeps its reservation and entry.
                                done.push(Done::Recorded(id, outcome, reply));
                            } else {
                                done.push(Done::Refused { id, shard, reservation, value, outcome, reply });
                            }
                        }
                        Err(e) => {
                            let outcome = SubmitOutcome::Unavailable(Self::unreadable(e));
                            done.push(Done::Refused { id, shard, reservation, value, outcome, reply });
                        }
                    }
                }
                CommitItem::Payment { record, pending, shard, reply } => {
                    if !self.claim_key(&record, now, &mut claimed_keys) {
                        let (id, payer) = (record.id, record.authorization.from);
                        done.push(Done::Refused {
                            id,
                            shard,
                            reservation: BalanceKey { chain_id: record.chain_id, token: record.asset, owner: payer },
                            value: record.authorization.value,
                            outcome: SubmitOutcome::Rejected {
                                id: Some(id),
                                payer: Some(payer),
                                rejection: Rejection::new(
                                    Reason::IdempotencyKeyReused,
                                    "this idempotency key was already used for another payment",
                                ),
                            },
                            reply,
                        });
                        continue;
                    }
                    sequence += 1;
                    done.push(Done::Accepted {
                        id: record.id,
                        payer: record.authorization.from,
                        status: record.status.clone(),
                        strategy: record.policy.name(),
                        shard,
                        reservation: record.balance_key(),
                        value: record.authorization.value,
                        reply,
                    });
                    batch.push(Write::Event(SettlementEvent {
                        sequence,
                        merchant_number: record.merchant_number,
                        payment_id: record.id,
                        status: record.status.clone(),
                        channel: None,
                    }));
                    batch.push(Write::Enqueue(pending));
                    batch.push(Write::Payment(record));
                }
                CommitItem::Reply { outcome, reply } => done.push(Done::Reply(outcome, reply)),
                CommitItem::ChannelReverted { id } => {
                    self.reverting.remove(&id);
                }
                CommitItem::ChannelWrite { record, reply, .. } if self.reverting.contains(&record.channel.id) => {
                    reply.send(Err(crate::Error::LedgerClosed("a write of this channel failed; retry".into())));
                }
                CommitItem::Channel { record, reply, .. } if self.reverting.contains(&record.channel.id) => {
                    let _ = reply.send(SubmitOutcome::Unavailable(
                        "an earlier write of this channel failed; send this voucher again".into(),
                    ));
                }
                CommitItem::ChannelWrite { record, event, previous, reply } => {
                    if let Some((merchant_number, status)) = event {
                        sequence += 1;
                        let c = &record.channel;
                        batch.push(Write::Event(SettlementEvent {
                            sequence,
                            merchant_number,
                            payment_id: PaymentId(c.id),
                            status,
                            channel: Some(crate::domain::ChannelSnapshot {
                                charged: c.charged,
                                total_claimed: c.onchain.total_claimed,
                                balance: c.onchain.balance,
                            }),
                        }));
                    }
                    batch.push(Write::Channel(record));
                    done.push(Done::ChannelWrite(reply, previous));
                }
                CommitItem::Channel { record, previous, shard, outcome, reply } => {
                    batch.push(Write::Channel(record));
                    done.push(Done::Channel { previous, shard, outcome, reply });
                }
                CommitItem::Merchant((merchant, reply)) => {
                    batch.push(Write::Merchant(merchant));
                    done.push(Done::Merchant(reply));
                }
                CommitItem::Settlement { intents, transitions, reply } => {
                    match self.settlement_writes(intents, transitions, &mut sequence, batch, &mut group_intents) {
                        Ok(settled) => done.push(Done::Settlement { settled, reply }),
                        Err(err) => {
                            let _ = reply.send(Err(err));
                        }
                    }
                }
            }
        }

        let result = if batch.is_empty() {
            Ok(())
        } else if let Err(err) = numbering {
            Err(err)
        } else {
            attempted = true;
            let started = Instant::now();
            let result = self.ledger.commit(batch);
            metrics::histogram!(crate::metrics::COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
            metrics::histogram!(crate::metrics::COMMIT_GROUP_SIZE).record(done.len() as f64);
            result
        };
        let result = match result {
            // A write reported failed may have reached the disk all the
            // same (an fsync error after the log write). Then its answers
            // stand: telling a payer "retry" for a payment that will be
            // settled, keeping a reservation the ledger released, or taking
            // back a voucher the ledger holds would make the shards
            // disagree with the disk.
            // Only a group that was written can have landed.
            Err(err) if attempted && self.landed(batch) => {
                tracing::warn!(%err, items = done.len(), "a group commit reported failed is on disk: it stands");
                metrics::counter!(crate::metrics::COMMIT_ERRORS).increment(1);
                Ok(())
            }
            result => result,
        };
        if result.is_ok() {
            self.changed_channels.add(batch.writes().iter().filter_map(|write| match write {
                Write::Channel(record) => Some((record.chain_id, record.channel.id)),
                _ => None,
            }));
            self.payment_waiters.wake(batch.writes().iter().filter_map(|write| match write {
                Write::Event(event) => Some(event.payment_id),
                _ => None,
            }));
        }
        batch.clear();
        if result.is_err() {
            for slot in claimed_keys {
                self.keys.remove(&slot);
            }
        }

        match result {
            Ok(()) => {
                // Published before any reply: whoever hears back can watch it.
                self.last_sequence = sequence;
                if sequence != first_sequence {
                    self.events.send_replace(sequence);
                }
                let mut accepted = 0u64;
                for item in done.drain(..) {
                    match item {
                        Done::Accepted { id, payer, status, strategy, reply, .. } => {
                            accepted += 1;
                            if !self.reverted.is_empty() {
                                self.reverted.remove(&id);
                            }
                            self.enqueue(strategy);
                            let _ = reply.send(SubmitOutcome::Accepted { id, payer, status });
                        }
                        Done::Recorded(id, outcome, reply) => {
                            // A write reported failed reached the disk after
                            // all: what the shard answers of it from now on
                            // is true.
                            self.reverted.remove(&id);
                            let _ = reply.send(outcome);
                        }
                        Done::Reply(outcome, reply) => {
                            let outcome = match outcome {
                                SubmitOutcome::Duplicate { id, .. } if self.reverted.contains_key(&id) => {
                                    SubmitOutcome::Unavailable(
                                        "the original submit of this payment was not recorded; retry".into(),
                                    )
                                }
                                outcome => outcome,
                            };
                            let _ = reply.send(outcome);
                        }
                        Done::Refused { id, shard, reservation, value, outcome, reply } => {
                            self.refuse(id, shard, reservation, value);
                            let _ = reply.send(outcome);
                        }
                        Done::Merchant(reply) => {
                            let _ = reply.send(Ok(()));
                        }
                        Done::ChannelWrite(reply, _) => reply.send(Ok(())),
                        Done::Channel { outcome, reply, .. } => {
                            metrics::counter!(crate::metrics::VOUCHERS_ACCEPTED).increment(1);
                            let _ = reply.send(outcome);
                        }
                        Done::Settlement { settled, reply } => {
                            for s in settled {
                                if let Some(strategy) = s.dequeued {
                                    self.dequeue(strategy);
                                }
                                if let Some(strategy) = s.requeue {
                                    self.enqueue(strategy);
                                }
                                let _ = self.shards[s.shard].send(ShardMsg::Settled {
                                    id: s.id,
                                    status: s.status,
                                    reservation: s.reservation,
                                });
                            }
                            self.publish_depths();
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
                if accepted > 0 {
                    metrics::counter!(crate::metrics::PAYMENTS_ACCEPTED).increment(accepted);
                    self.publish_depths();
                }
            }
            Err(err) => {
                tracing::error!(%err, items = done.len(), "group commit failed; nothing in it was accepted");
                metrics::counter!(crate::metrics::COMMIT_ERRORS).increment(1);
                // A write reported failed may be on disk after all (a
                // ledger reopened replays its log): numbering goes on after
                // whatever event is there, never over it.
                if sequence != first_sequence {
                    self.numbering_unsure = true;
                    let _ = self.read_numbering();
                }
                let err = Arc::new(err);
                // The storage's own words (file paths, its messages) are
                // for the log above, not for clients.
                let message = "the ledger could not record it just now; nothing was accepted; retry".to_owned();
                for item in done.drain(..) {
                    match item {
                        Done::Accepted { id, shard, reservation, value, reply, .. } => {
                            self.refuse(id, shard, reservation, value);
                            let _ = reply.send(SubmitOutcome::Unavailable(message.clone()));
                        }
                        Done::Reply(_, reply) => {
                            let _ = reply.send(SubmitOutcome::Unavailable(message.clone()));
                        }
                        Done::Recorded(id, _, reply) => {
                            // Recorded all the same, as the ledger read
                            // showed: the shard keeps it, and its duplicates
                            // are true.
                            self.reverted.remove(&id);
                            let _ = reply.send(SubmitOutcome::Unavailable(message.clone()));
                        }
                        Done::Refused { id, shard, reservation, value, outcome, reply } => {
                            self.refuse(id, shard, reservation, value);
                            let _ = reply.send(outcome);
                        }
                        Done::Channel { previous, shard, reply, .. } => {
                            self.revert_channel(previous, shard);
                            let _ = reply.send(SubmitOutcome::Unavailable(message.clone()));
                        }
                        Done::Merchant(reply) | Done::Settlement { reply, .. } => {
                            let _ = reply.send(Err(crate::Error::Commit(err.clone())));
                        }
                        Done::ChannelWrite(reply, previous) => {
                            if let Some((previous, shard)) = previous {
                                self.revert_channel(previous, shard);
                            }
                            reply.send(Err(crate::Error::Commit(err.clone())));
                        }
                    }
                }
            }
        }
    }
}
