//! The verification pipeline: stateless verify → stateful checks sharded by
//! payer → group commit → ack.
//!
//! ```text
//!  submit ──► [verify queue] ──► verifier threads ──► [shard queues] ──► payer shards ──► [commit queue] ──► committer
//!  (async)     bounded MPMC      decode, steps 1–8,    bounded, one       replay index,      bounded          WriteBatch + fsync,
//!                                EIP-712 + ecrecover   per shard          reservations                        then the acks
//!     ▲                                                                                                          │
//!     └───────────────────────────────────── oneshot: ACCEPTED / DUPLICATE / REJECTED ◄──────────────────────────┘
//! ```
//!
//! No mutex on the hot path: every piece of mutable state has one owner
//! thread (a shard owns its payers' replay entries and reservations, the
//! committer owns the event sequence and the settlement queue book), and
//! work moves between owners over bounded crossbeam channels. A payment is
//! answered ACCEPTED only after the group that records it is fsync'd; a
//! DUPLICATE is answered only after the group that recorded the original.

mod committer;
mod messages;
mod shard;
mod waiters;

pub use self::waiters::{PaymentWaiters, Waiter};

use std::{
    sync::Arc,
    thread::{self, JoinHandle},
};

use alloy::primitives::Address;
use crossbeam::channel::{self, Receiver, Sender, TrySendError};
use tokio::sync::{oneshot, watch};

use self::{
    committer::Committer,
    messages::{CommitItem, ShardMsg},
    shard::Shard,
};
use crate::{
    Error, Result,
    balance::BalanceSource,
    channels::{ChannelContracts, ChannelSource, ChannelView, NoChannels, VoucherVerifier},
    domain::{Merchant, PaymentId, PaymentStatus, Submission},
    ledger::Ledger,
    reason::{InvalidField, Rejection},
    verify::{MinValidity, Refusal, Verifier},
};

/// Pipeline sizing.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Verifier threads (stage 1); 0 means one per core.
    pub verifiers: usize,
    /// Payer shards (stage 2), one thread each.
    pub shards: usize,
    /// Capacity of each queue between stages.
    pub queue_capacity: usize,
    /// Most items in one group commit.
    pub max_group: usize,
    /// Minimum validity left per settlement strategy.
    pub min_validity: MinValidity,
    /// How long after `validBefore` a payment stays in the in-memory replay
    /// window (it is in the ledger forever). Stage 1 refuses a payment that
    /// close to its `validBefore`, so this only has to outlast the time a
    /// verified payment can wait for its shard; the window's size is
    /// rate × (validity + retention).
    pub replay_retention_secs: u64,
    /// The `batch-settlement` contracts vouchers and deposits are signed for.
    pub channel_contracts: ChannelContracts,
    /// Where unknown channels' on-chain state is read from.
    pub channels: Arc<dyn ChannelSource>,
    /// Channel deposits below this are refused before anything goes on chain.
    pub min_deposit: u128,
    /// The receiver authorizer x402d claims channels with, if it holds one:
    /// vouchers of channels naming another are refused.
    pub receiver_authorizer: Option<Address>,
    /// Per shard: most payments waiting for a balance read, and most
    /// vouchers waiting for a channel read or deposit; beyond, submits are
    /// answered UNAVAILABLE.
    pub max_parked: usize,
    /// The chains payments are settled on; a payment on another network is
    /// refused (`invalid_network`). `None`: record only, any network.
    pub settled_chains: Option<Vec<u64>>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            verifiers: 0,
            shards: 2,
            queue_capacity: 65_536,
            max_group: 4096,
            min_validity: MinValidity::default(),
            replay_retention_secs: 300,
            channel_contracts: ChannelContracts::default(),
            channels: Arc::new(NoChannels),
            min_deposit: 0,
            receiver_authorizer: None,
            max_parked: 65_536,
            settled_chains: None,
        }
    }
}

/// What a submit came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Verified and durably recorded.
    Accepted { id: PaymentId, payer: Address, status: PaymentStatus },
    /// The same payment was accepted before; this is where it stands. It is
    /// paid for already: whatever it paid for must not be served again,
    /// unless `retry`: the submit carried the idempotency key the original
    /// was accepted with, from the same merchant (a retry of a request
    /// whose answer was lost).
    Duplicate { id: PaymentId, payer: Address, status: PaymentStatus, retry: bool },
    /// A verification rule failed.
    Rejected { id: Option<PaymentId>, payer: Option<Address>, rejection: Rejection },
    /// The request is malformed.
    Invalid(InvalidField),
    /// The ledger could not record it; nothing was accepted. Retryable.
    Unavailable(String),
    /// Checked only (a dry run): it would be accepted. Nothing was reserved
    /// or recorded.
    Verified { id: PaymentId, payer: Address },
    /// A voucher was verified and the channel's new charged total recorded
    /// (for a dry run: would be, and `channel` is as it stands).
    VoucherAccepted { payer: Address, channel: ChannelView },
    /// A voucher failed a rule; `channel` is the channel's state when it is
    /// known, so the client can resynchronise.
    VoucherRejected { payer: Option<Address>, rejection: Rejection, channel: Option<ChannelView> },
}

impl From<Refusal> for SubmitOutcome {
    fn from(refusal: Refusal) -> Self {
        match refusal {
            Refusal::Rejected { id, payer, rejection } => Self::Rejected { id, payer, rejection },
            Refusal::Invalid(field) => Self::Invalid(field),
        }
    }
}

/// A payment's new settlement status, recorded by [`Pipeline::record_settlement`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub id: PaymentId,
    pub status: PaymentStatus,
}

/// A change to a transaction intent, recorded by
/// [`Pipeline::record_settlement`] together with payment transitions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntentChange {
    /// Insert or replace it.
    Record(crate::domain::TxIntent),
    /// Delete it: nothing about it needs watching any more.
    Forget(crate::domain::IntentKey),
}

/// The pipeline is full; the submission is handed back.
#[derive(Debug)]
pub struct Overloaded(pub Box<Submission>);

pub(crate) struct VerifyJob {
    merchant: Arc<Merchant>,
    submission: Submission,
    reply: oneshot::Sender<SubmitOutcome>,
    /// Check only: answer [`SubmitOutcome::Verified`] (or a rejection) and
    /// change nothing.
    dry_run: bool,
}

/// A request to the committer that is not a payment: a merchant write.
pub(crate) type MerchantWrite = (Merchant, oneshot::Sender<Result<()>>);

/// The channels whose records changed on disk since the last
/// [`ChangedChannels::take`]: the committer adds a group's channel ids once
/// it is durable, so a reader of those records sees what was committed and
/// nothing that a failed commit left in a shard. The claims keep their view
/// of the channels current with it instead of reading them all each round.
/// A set, so it stays as large as the channels at most, however long nobody
/// takes it; one lock per group commit, not per voucher.
#[derive(Debug, Default)]
pub struct ChangedChannels {
    ids: std::sync::Mutex<std::collections::HashSet<alloy::primitives::B256>>,
}

impl ChangedChannels {
    /// Adds `ids` (after they are durable).
    pub fn add(&self, ids: impl IntoIterator<Item = alloy::primitives::B256>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_some() {
            self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(ids);
        }
    }

    /// The ids changed since the last call.
    pub fn take(&self) -> std::collections::HashSet<alloy::primitives::B256> {
        std::mem::take(&mut *self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

/// A running pipeline. Dropping it (or [`Pipeline::shutdown`]) stops the
/// threads once the queued work is done.
pub struct Pipeline {
    verify_tx: Option<Sender<VerifyJob>>,
    /// The shards' bounded queues of new payments (and `Stop`).
    shard_txs: Vec<Sender<ShardMsg>>,
    /// The shards' unbounded control queues: whoever must not block on a
    /// busy shard (the committer, async callers) sends there.
    shard_controls: Vec<Sender<ShardMsg>>,
    /// The committer's unbounded queue for async callers.
    commit_control: Option<Sender<CommitItem>>,
    /// Joined in this order on shutdown: each stage drains before the next stops.
    verifier_threads: Vec<JoinHandle<()>>,
    shard_threads: Vec<JoinHandle<()>>,
    committer_thread: Option<JoinHandle<()>>,
    events: watch::Receiver<u64>,
    changed_channels: Arc<ChangedChannels>,
    payment_waiters: Arc<PaymentWaiters>,
    /// The name of a pipeline thread that died, once one has.
    died: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("verifiers", &self.verifier_threads.len())
            .field("shards", &self.shard_threads.len())
            .finish_non_exhaustive()
    }
}

impl Pipeline {
    /// Rebuilds the in-memory state (replay window, reservations, settlement
    /// queue) from `ledger` and starts the threads.
    pub fn start(config: &PipelineConfig, ledger: &Arc<dyn Ledger>, balances: &Arc<dyn BalanceSource>) -> Result<Self> {
        let verifiers = match config.verifiers {
            0 => thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        let shards = config.shards.max(1);
        let cap = config.queue_capacity.max(1);

        let (verify_tx, verify_rx) = channel::bounded::<VerifyJob>(cap);
        let (commit_tx, commit_rx) = channel::bounded::<CommitItem>(cap);
        let (commit_control, commit_control_rx) = channel::unbounded::<CommitItem>();
        let mut shard_txs = Vec::with_capacity(shards);
        let mut shard_rxs = Vec::with_capacity(shards);
        let mut shard_controls = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = channel::bounded::<ShardMsg>(cap);
            let (control, control_rx) = channel::unbounded::<ShardMsg>();
            shard_txs.push(tx);
            shard_controls.push(control);
            shard_rxs.push((rx, control_rx));
        }

        // Rebuild state from the ledger before any thread runs.
        let now = crate::domain::unix_millis() / 1000;
        let mut shard_states: Vec<Shard> = (0..shards)
            .map(|i| {
                let control = shard_controls[i].clone();
                Shard::new(i, balances.clone(), control, commit_tx.clone(), config.replay_retention_secs)
                    .with_channels(config.channels.clone())
                    .with_max_parked(config.max_parked)
            })
            .collect();
        let channels = ledger.channels()?;
        for record in &channels {
            shard_states[shard_of_channel(record.channel.id, shards)].restore_channel(record.clone());
        }
        let last_sequence = ledger.last_event_sequence()?;
        let (events_tx, events_rx) = watch::channel(last_sequence);
        let mut committer =
            Committer::new(ledger.clone(), last_sequence, events_tx, config.max_group, shard_controls.clone())
                .with_key_retention(config.replay_retention_secs);
        // What start-up needs of the history, read without going over the
        // rest of it: payments still in the replay window (and their
        // idempotency keys), then the open ones before it, which hold
        // reservations (exactly those in the settlement queue).
        let cutoff = now.saturating_sub(config.replay_retention_secs);
        let mut restore = |record: &crate::domain::PaymentRecord| {
            let i = shard_of(record.authorization.from, shards);
            shard_states[i].restore(record, now);
            committer.restore_key(record, now);
        };
        ledger.for_each_payment_valid_from(cutoff, &mut |record| restore(&record))?;
        let pending = ledger.pending()?;
        for key in pending.iter().filter(|k| k.deadline < cutoff) {
            if let Some(record) = ledger.payment(&key.id)? {
                restore(&record);
            }
        }
        committer.restore_pending(&pending, ledger)?;
        let changed_channels = committer.changed_channels();
        let payment_waiters = committer.payment_waiters();
        tracing::info!(
            replay_entries = shard_states.iter().map(Shard::replay_len).sum::<usize>(),
            channels = channels.len(),
            pending = pending.len(),
            last_sequence,
            "pipeline state rebuilt from the ledger"
        );

        let (died_tx, died_rx) = watch::channel(None);
        let mut pipeline = Self {
            verify_tx: Some(verify_tx),
            shard_txs: shard_txs.clone(),
            shard_controls,
            commit_control: Some(commit_control),
            verifier_threads: Vec::new(),
            shard_threads: Vec::new(),
            committer_thread: None,
            events: events_rx,
            changed_channels,
            payment_waiters,
            died: died_rx,
        };
        let died = Arc::new(died_tx);
        pipeline.committer_thread =
            Some(spawn("x402d-commit".into(), &died, move || committer.run(&commit_rx, &commit_control_rx))?);
        for (i, (state, (rx, control))) in shard_states.into_iter().zip(shard_rxs).enumerate() {
            pipeline.shard_threads.push(spawn(format!("x402d-shard-{i}"), &died, move || state.run(&rx, &control))?);
        }
        let shard_txs = Arc::new(shard_txs);
        for i in 0..verifiers {
            let rx = verify_rx.clone();
            let shard_txs = shard_txs.clone();
            let mut verifier = Verifier::new(config.min_validity).settling(config.settled_chains.clone());
            let mut vouchers = VoucherVerifier::new(config.channel_contracts)
                .settling(config.settled_chains.clone())
                .min_deposit(config.min_deposit)
                .claiming_with(config.receiver_authorizer);
            pipeline.verifier_threads.push(spawn(format!("x402d-verify-{i}"), &died, move || {
                run_verifier(&mut verifier, &mut vouchers, &rx, &shard_txs);
            })?);
        }
        Ok(pipeline)
    }

    /// Queues `submission` for `merchant`; the receiver yields the outcome
    /// once it is final (for an accepted payment: once it is on disk).
    pub fn try_submit(
        &self,
        merchant: Arc<Merchant>,
        submission: Submission,
    ) -> Result<oneshot::Receiver<SubmitOutcome>, Overloaded> {
        self.try_enqueue(merchant, submission, false)
    }

    /// Runs every check of a submit, against the same state, and changes
    /// nothing: no reservation, no record (x402 `/verify`).
    pub fn try_verify(
        &self,
        merchant: Arc<Merchant>,
        submission: Submission,
    ) -> Result<oneshot::Receiver<SubmitOutcome>, Overloaded> {
        self.try_enqueue(merchant, submission, true)
    }

    fn try_enqueue(
        &self,
        merchant: Arc<Merchant>,
        submission: Submission,
        dry_run: bool,
    ) -> Result<oneshot::Receiver<SubmitOutcome>, Overloaded> {
        let (reply, rx) = oneshot::channel();
        let tx = self.verify_tx.as_ref().expect("set until shutdown");
        match tx.try_send(VerifyJob { merchant, submission, reply, dry_run }) {
            Ok(()) => Ok(rx),
            Err(TrySendError::Full(job) | TrySendError::Disconnected(job)) => {
                metrics::counter!(crate::metrics::SUBMITS_OVERLOADED).increment(1);
                Err(Overloaded(Box::new(job.submission)))
            }
        }
    }

    /// Records `merchant` durably, through the same writer as payments.
    pub(crate) fn write_merchant(&self, merchant: Merchant) -> Result<oneshot::Receiver<Result<()>>> {
        let (reply, rx) = oneshot::channel();
        self.commit_control
            .as_ref()
            .expect("set until shutdown")
            .send(CommitItem::Merchant((merchant, reply)))
            .map_err(|_| Error::PipelineStopped)?;
        Ok(rx)
    }

    /// Records settlement progress atomically: transaction intents (written
    /// before their broadcast) and payment state changes, each with its
    /// event. A payment that is no longer owed leaves the settlement queue
    /// and its reservation is released.
    pub fn record_settlement(
        &self,
        intents: Vec<IntentChange>,
        transitions: Vec<Transition>,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let (reply, rx) = oneshot::channel();
        self.commit_control
            .as_ref()
            .expect("set until shutdown")
            .send(CommitItem::Settlement { intents, transitions, reply })
            .map_err(|_| Error::PipelineStopped)?;
        Ok(rx)
    }

    /// Follows the sequence of the last durable event.
    /// Mirrors a fresh read of channel `id`'s on-chain state (and when it
    /// was claimed, after a claim) in its shard, and records it. A channel
    /// the engine has never seen a voucher for is left alone.
    pub fn sync_channel(
        &self,
        id: alloy::primitives::B256,
        onchain: x402_channel::OnChain,
        claimed: Option<crate::channels::ClaimOutcome>,
    ) -> Result<oneshot::Receiver<Result<()>>> {
        let (reply, rx) = oneshot::channel();
        let shard = shard_of_channel(id, self.shard_txs.len());
        self.shard_controls[shard]
            .send(ShardMsg::ChannelSync { id, onchain, claimed, reply })
            .map_err(|_| Error::PipelineStopped)?;
        Ok(rx)
    }

    /// Asks for a claim (`claim`) or a refund of up to `refund` of channel
    /// `id` in the next claim round; answers with the channel once the
    /// request is recorded (`None` for a channel the engine does not know).
    pub fn request_channel(
        &self,
        id: alloy::primitives::B256,
        claim: bool,
        refund: Option<u128>,
    ) -> Result<oneshot::Receiver<Result<Option<ChannelView>>>> {
        let (reply, rx) = oneshot::channel();
        let shard = shard_of_channel(id, self.shard_txs.len());
        self.shard_controls[shard]
            .send(ShardMsg::ChannelRequest { id, claim, refund, reply })
            .map_err(|_| Error::PipelineStopped)?;
        Ok(rx)
    }

    pub fn events(&self) -> watch::Receiver<u64> {
        self.events.clone()
    }

    /// Interest in payment `id`: woken when a commit records an event of it;
    /// see [`PaymentWaiters`].
    pub fn wait_for_payment(&self, id: PaymentId) -> Waiter {
        self.payment_waiters.wait_for(id)
    }

    /// The channels committed since the last look; see [`ChangedChannels`].
    pub fn changed_channels(&self) -> Arc<ChangedChannels> {
        self.changed_channels.clone()
    }

    /// Follows the pipeline's health: the name of the first thread that
    /// died, `None` while all live.
    pub fn died(&self) -> watch::Receiver<Option<String>> {
        self.died.clone()
    }

    /// Stops accepting work, lets queued work finish and joins the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    /// Stops stage by stage: verifiers drain their queue and exit, then the
    /// shards (told to stop, since the committer holds senders to them for
    /// reverts), then the committer once every sender to it is gone.
    fn stop(&mut self) {
        fn join(handles: impl IntoIterator<Item = JoinHandle<()>>) {
            for handle in handles {
                if handle.join().is_err() {
                    tracing::error!("a pipeline thread panicked");
                }
            }
        }
        self.verify_tx.take();
        join(self.verifier_threads.drain(..));
        for tx in self.shard_txs.drain(..) {
            let _ = tx.send(ShardMsg::Stop);
        }
        join(self.shard_threads.drain(..));
        self.shard_controls.clear();
        self.commit_control.take();
        join(self.committer_thread.take());
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Starts a pipeline thread; if it panics, `died` names it.
fn spawn(
    name: String,
    died: &Arc<watch::Sender<Option<String>>>,
    f: impl FnOnce() + Send + 'static,
) -> Result<JoinHandle<()>> {
    /// Reports the thread's panic when dropped while unwinding.
    struct Watch(Arc<watch::Sender<Option<String>>>, String);
    impl Drop for Watch {
        fn drop(&mut self) {
            if thread::panicking() {
                tracing::error!(thread = %self.1, "a pipeline thread died; the node stops answering payments");
                self.0.send_replace(Some(self.1.clone()));
            }
        }
    }
    let watch = Watch(died.clone(), name.clone());
    Ok(thread::Builder::new().name(name).spawn(move || {
        let _watch = watch;
        f();
    })?)
}

/// The shard that owns `payer`. Addresses are hashes, so their leading bytes
/// spread evenly.
fn shard_of(payer: Address, shards: usize) -> usize {
    let lead = u64::from_be_bytes(payer[..8].try_into().expect("8 bytes"));
    (lead % shards as u64) as usize
}

/// The shard of a channel: its requests are checked there one at a time.
fn shard_of_channel(id: alloy::primitives::B256, shards: usize) -> usize {
    let lead = u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
    (lead % shards as u64) as usize
}

fn run_verifier(
    verifier: &mut Verifier,
    vouchers: &mut VoucherVerifier,
    rx: &Receiver<VerifyJob>,
    shards: &[Sender<ShardMsg>],
) {
    metrics::gauge!(crate::metrics::QUEUE_DEPTH, "stage" => "verify").set(0.0);
    let mut since_gauge = 0u32;
    while let Ok(job) = rx.recv() {
        since_gauge += 1;
        if since_gauge == 1024 {
            since_gauge = 0;
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "stage" => "verify").set(rx.len() as f64);
        }
        let now = crate::domain::unix_millis() / 1000;
        let VerifyJob { merchant, submission, reply, dry_run } = job;
        let submission = match submission {
            Submission { requirements, input: crate::domain::PaymentInput::Voucher(payload), .. } => {
                match vouchers.verify(&merchant, &requirements, *payload) {
                    Ok(mut verified) => {
                        verified.dry_run = dry_run;
                        let shard = shard_of_channel(verified.channel_id, shards.len());
                        if shards[shard].send(ShardMsg::Voucher { merchant, verified, reply }).is_err() {
                            return;
                        }
                    }
                    Err(refusal) => {
                        let _ = reply.send(match refusal {
                            Refusal::Rejected { payer, rejection, .. } => {
                                crate::metrics::rejected(rejection.reason);
                                SubmitOutcome::VoucherRejected { payer, rejection, channel: None }
                            }
                            Refusal::Invalid(field) => SubmitOutcome::Invalid(field),
                        });
                    }
                }
                continue;
            }
            exact => exact,
        };
        match verifier.verify(&merchant, submission, now) {
            Ok(mut verified) => {
                verified.dry_run = dry_run;
                let shard = shard_of(verified.payer(), shards.len());
                if shards[shard].send(ShardMsg::Payment { merchant, verified, reply }).is_err() {
                    return;
                }
            }
            Err(refusal) => {
                match &refusal {
                    Refusal::Rejected { rejection, .. } => crate::metrics::rejected(rejection.reason),
                    Refusal::Invalid(_) => metrics::counter!(crate::metrics::SUBMITS_INVALID).increment(1),
                }
                let _ = reply.send(refusal.into());
            }
        }
    }
}

/// Keys of the settlement queue, by strategy, for the queue-depth gauge.
pub(crate) fn pending_gauge(strategy: &'static str, depth: usize) {
    metrics::gauge!(crate::metrics::SETTLEMENT_QUEUE_DEPTH, "strategy" => strategy).set(depth as f64);
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use x402_devnet::Payer;

    use alloy::primitives::{B256, U256, address};

    use super::*;
    use crate::{
        balance::{Account, ConfiguredBalances},
        domain::{PaymentInput, Requirements},
        ledger::{MemoryLedger, WriteBatch},
        reason::Reason,
        testing::ManualBalances,
    };

    /// A memory ledger whose commits fail while `failing` is set, and wait
    /// while a test holds `stall`.
    #[derive(Debug, Default)]
    struct FlakyLedger {
        inner: MemoryLedger,
        failing: AtomicBool,
        stall: std::sync::Mutex<()>,
        /// `for_each_payment` calls: reads of the whole history.
        full_scans: std::sync::atomic::AtomicUsize,
        /// The next this many commits fail.
        fail_next: std::sync::atomic::AtomicUsize,
    }

    impl Ledger for FlakyLedger {
        fn commit(&self, batch: &WriteBatch) -> Result<()> {
            drop(self.stall.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
            if self.fail_next.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                return Err(Error::Io(std::io::Error::other("one write lost")));
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Io(std::io::Error::other("disk on fire")));
            }
            self.inner.commit(batch)
        }
        fn payment(&self, id: &PaymentId) -> Result<Option<crate::domain::PaymentRecord>> {
            self.inner.payment(id)
        }
        fn for_each_payment(&self, visit: &mut dyn FnMut(crate::domain::PaymentRecord)) -> Result<()> {
            self.full_scans.fetch_add(1, Ordering::SeqCst);
            self.inner.for_each_payment(visit)
        }
        fn for_each_payment_valid_from(
            &self,
            from: u64,
            visit: &mut dyn FnMut(crate::domain::PaymentRecord),
        ) -> Result<()> {
            self.inner.for_each_payment_valid_from(from, visit)
        }
        fn prune(&self, before: u64) -> Result<crate::ledger::Pruned> {
            self.inner.prune(before)
        }
        fn pruned(&self, ids: &[PaymentId]) -> Result<Vec<PaymentId>> {
            self.inner.pruned(ids)
        }
        fn pending(&self) -> Result<Vec<crate::domain::PendingKey>> {
            self.inner.pending()
        }
        fn merchants(&self) -> Result<Vec<Merchant>> {
            self.inner.merchants()
        }
        fn events_after(&self, after: u64, limit: usize) -> Result<Vec<crate::domain::SettlementEvent>> {
            self.inner.events_after(after, limit)
        }
        fn last_event_sequence(&self) -> Result<u64> {
            self.inner.last_event_sequence()
        }
        fn intents(&self) -> Result<Vec<crate::domain::TxIntent>> {
            self.inner.intents()
        }
        fn channels(&self) -> Result<Vec<crate::domain::ChannelRecord>> {
            self.inner.channels()
        }
        fn channel(&self, id: &alloy::primitives::B256) -> Result<Option<crate::domain::ChannelRecord>> {
            self.inner.channel(id)
        }
    }

    const PAY_TO: Address = address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8");

    fn merchant() -> Arc<Merchant> {
        Arc::new(crate::testing::direct_merchant(PAY_TO))
    }

    fn submission(payer: &Payer, nonce: u8) -> Submission {
        let requirements = Requirements {
            scheme: "exact".into(),
            network: "eip155:31337".into(),
            amount: U256::from(100),
            asset: address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
            pay_to: PAY_TO,
            max_timeout_seconds: 60,
            eip712_name: "USD Coin".into(),
            eip712_version: "2".into(),
        };
        let now = crate::domain::unix_millis() / 1000;
        let payload = payer.sign_exact(&requirements, now - 60, now + 600, B256::repeat_byte(nonce));
        Submission::new(requirements, PaymentInput::Exact(payload))
    }

    fn start(ledger: &Arc<FlakyLedger>, payer: &Payer, balance: u64) -> Pipeline {
        let balances = ConfiguredBalances::new(None).with_account(
            31337,
            address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"),
            payer.address(),
            U256::from(balance),
        );
        let ledger: Arc<dyn Ledger> = ledger.clone();
        let balances: Arc<dyn BalanceSource> = Arc::new(balances);
        let config = PipelineConfig { verifiers: 2, shards: 3, ..PipelineConfig::default() };
        Pipeline::start(&config, &ledger, &balances).unwrap()
    }

    /// `payer`'s voucher of `max` for its channel of `config` (authorizer
    /// `authorizer`, 900 s withdraw delay), on the local chain.
    fn voucher_payload(
        payer: &Payer,
        domain: &x402_channel::ChannelDomain,
        config: &x402_channel::ChannelConfig,
        authorizer: Address,
        max: u128,
    ) -> crate::channels::VoucherPayload {
        let id = domain.channel_id(config);
        crate::channels::VoucherPayload {
            network: "eip155:31337".into(),
            config: config.clone(),
            channel_id: id,
            max_claimable: max,
            signature: payer.sign_voucher(domain, id, max),
            charge: None,
            extra: crate::channels::ChannelExtra { receiver_authorizer: authorizer, withdraw_delay: 900 },
            deposit: None,
            refund: None,
        }
    }

    fn submit(pipeline: &Pipeline, s: Submission) -> SubmitOutcome {
        pipeline.try_submit(merchant(), s).unwrap().blocking_recv().unwrap()
    }

    #[test]
    fn a_failed_commit_accepts_nothing_and_forgets_the_payment() {
        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        // The balance covers exactly one payment: a leaked reservation would show.
        let pipeline = start(&ledger, &payer, 100);
        let first = submission(&payer, 1);
        ledger.failing.store(true, Ordering::SeqCst);
        assert!(matches!(submit(&pipeline, first.clone()), SubmitOutcome::Unavailable(_)));
        ledger.failing.store(false, Ordering::SeqCst);
        assert!(matches!(submit(&pipeline, first.clone()), SubmitOutcome::Accepted { .. }));
        assert!(matches!(submit(&pipeline, first), SubmitOutcome::Duplicate { .. }));
        let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 2)) else {
            panic!("the second payment exceeds the balance");
        };
        assert_eq!(rejection.reason, Reason::InsufficientBalance);
    }

    #[test]
    fn a_payment_the_ledger_already_has_is_never_written_over() {
        let payer = Payer::random();
        let (open, settled) = (submission(&payer, 1), submission(&payer, 2));
        // The records as a first node wrote them.
        let records: Vec<_> = {
            let ledger = Arc::new(FlakyLedger::default());
            let pipeline = start(&ledger, &payer, 1_000);
            [&open, &settled]
                .iter()
                .map(|s| match submit(&pipeline, (*s).clone()) {
                    SubmitOutcome::Accepted { id, .. } => ledger.payment(&id).unwrap().unwrap(),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        // A running node whose shards never saw them (a write reported
        // failed that was recorded after all, an entry let go).
        let ledger = Arc::new(FlakyLedger::default());
        let pipeline = start(&ledger, &payer, 200);
        let mut batch = WriteBatch::default();
        batch.push(crate::ledger::Write::Payment(Box::new(records[0].clone())));
        let mut confirmed = records[1].clone();
        confirmed.status.state = crate::domain::PaymentState::Confirmed;
        batch.push(crate::ledger::Write::Payment(Box::new(confirmed.clone())));
        ledger.commit(&batch).unwrap();
        let sequence = ledger.last_event_sequence().unwrap();

        for (s, record) in [(&open, &records[0]), (&settled, &confirmed)] {
            match submit(&pipeline, s.clone()) {
                SubmitOutcome::Duplicate { id, status, .. } => {
                    assert_eq!((id, status.state), (record.id, record.status.state));
                }
                other => panic!("a recorded payment answered {other:?}"),
            }
            assert_eq!(ledger.payment(&record.id).unwrap().as_ref(), Some(record), "written over");
        }
        assert_eq!(ledger.last_event_sequence().unwrap(), sequence, "no event for a payment already recorded");
        // The open one is owed and holds its reservation; the settled one
        // holds none: of 200, 100 is left.
        assert!(matches!(submit(&pipeline, submission(&payer, 3)), SubmitOutcome::Accepted { .. }));
        let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 4)) else {
            panic!("the open payment's reservation was not kept");
        };
        assert_eq!(rejection.reason, Reason::InsufficientBalance);
    }

    #[test]
    fn a_payment_whose_record_retention_deleted_is_refused() {
        let payer = Payer::random();
        let payment = submission(&payer, 1);
        let ledger = Arc::new(FlakyLedger::default());
        let pipeline = start(&ledger, &payer, 1_000);
        let SubmitOutcome::Accepted { id, .. } = submit(&pipeline, payment.clone()) else { panic!("accepted") };
        drop(pipeline);
        // Settled, then deleted by retention (as if far in the past).
        let mut record = ledger.payment(&id).unwrap().unwrap();
        record.status.state = crate::domain::PaymentState::Confirmed;
        let mut batch = WriteBatch::default();
        batch.push(crate::ledger::Write::Dequeue(crate::domain::PendingKey {
            merchant_number: record.merchant_number,
            deadline: record.authorization.valid_before_secs(),
            id,
        }));
        batch.push(crate::ledger::Write::Payment(Box::new(record)));
        ledger.commit(&batch).unwrap();
        assert_eq!(ledger.prune(u64::MAX).unwrap().payments, 1);

        // Its authorization submitted again: refused, not recorded anew.
        let pipeline = start(&ledger, &payer, 1_000);
        let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, payment) else {
            panic!("a spent nonce was accepted again");
        };
        assert_eq!(rejection.reason, Reason::NonceAlreadyUsed);
        assert_eq!(ledger.payment(&id).unwrap(), None);
    }

    #[test]
    fn only_durable_channel_writes_are_reported_changed() {
        let ledger = Arc::new(FlakyLedger::default());
        let record = crate::ledger::conformance::sample_channel(4, 100, false);
        let id = record.channel.id;
        let mut batch = WriteBatch::default();
        batch.push(crate::ledger::Write::Channel(Box::new(record.clone())));
        ledger.commit(&batch).unwrap();
        let pipeline = start(&ledger, &Payer::random(), 0);
        let changed = pipeline.changed_channels();
        assert!(changed.take().is_empty(), "restored, not changed");

        let mut onchain = record.channel.onchain;
        onchain.total_claimed += 1;
        ledger.failing.store(true, Ordering::SeqCst);
        assert!(pipeline.sync_channel(id, onchain, None).unwrap().blocking_recv().unwrap().is_err());
        assert!(changed.take().is_empty(), "a failed commit changed nothing on disk");
        ledger.failing.store(false, Ordering::SeqCst);
        pipeline.sync_channel(id, onchain, None).unwrap().blocking_recv().unwrap().unwrap();
        assert_eq!(changed.take(), std::collections::HashSet::from([id]));
        assert!(changed.take().is_empty(), "taken once");
        assert_eq!(ledger.channel(&id).unwrap().unwrap().channel.onchain.total_claimed, onchain.total_claimed);
    }

    #[test]
    fn state_is_rebuilt_from_the_ledger() {
        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        // Signed once: a resubmit must be byte-identical to be a duplicate.
        let submissions: Vec<_> = (1..=3).map(|n| submission(&payer, n)).collect();
        let ids: Vec<_> = {
            let pipeline = start(&ledger, &payer, 300);
            submissions
                .iter()
                .map(|s| match submit(&pipeline, s.clone()) {
                    SubmitOutcome::Accepted { id, .. } => id,
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        assert_eq!(ledger.pending().unwrap().len(), 3);
        assert_eq!(ledger.last_event_sequence().unwrap(), 3);
        // Long past its validBefore, and still open (its transaction not
        // mined yet): it holds a reservation all the same. And a history of
        // settled payments start-up need not read.
        let mut old = crate::ledger::conformance::sample_payment(9, 1_000);
        (old.authorization.from, old.asset, old.authorization.value) =
            (payer.address(), address!("0x5FbDB2315678afecb367f032d93F642f64180aa3"), U256::from(100));
        old.status.state = crate::domain::PaymentState::Submitted;
        let mut batch = WriteBatch::default();
        batch.push(crate::ledger::Write::Enqueue(crate::domain::PendingKey {
            merchant_number: old.merchant_number,
            deadline: 1_000,
            id: old.id,
        }));
        batch.push(crate::ledger::Write::Payment(Box::new(old)));
        for seed in 10..50 {
            let mut settled = crate::ledger::conformance::sample_payment(seed, 1_000);
            settled.status.state = crate::domain::PaymentState::Confirmed;
            batch.push(crate::ledger::Write::Payment(Box::new(settled)));
        }
        ledger.commit(&batch).unwrap();

        let pipeline = start(&ledger, &payer, 400);
        assert_eq!(ledger.full_scans.load(Ordering::SeqCst), 0, "start-up read the whole history");
        for (s, id) in submissions.iter().zip(&ids) {
            match submit(&pipeline, s.clone()) {
                SubmitOutcome::Duplicate { id: dup, .. } => assert_eq!(&dup, id),
                other => panic!("{other:?}"),
            }
        }
        // The four restored reservations use up the balance.
        let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 4)) else {
            panic!("reservations were restored");
        };
        assert_eq!(rejection.reason, Reason::InsufficientBalance);
        assert_eq!(*pipeline.events().borrow(), 3);
    }

    #[test]
    fn settlement_transitions_are_recorded_and_release_reservations() {
        use crate::domain::{IntentState, PaymentState, TxIntent};

        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        let pipeline = start(&ledger, &payer, 100);
        let first = submission(&payer, 1);
        let SubmitOutcome::Accepted { id, .. } = submit(&pipeline, first.clone()) else { panic!("accepted") };
        let record = |state, block: Option<u64>| -> Result<()> {
            let mut status = PaymentStatus::new(state, 1);
            status.transaction = Some(B256::repeat_byte(7));
            status.block = block;
            let intent = TxIntent {
                chain_id: 31337,
                signer: Address::repeat_byte(1),
                nonce: 0,
                tx_hashes: vec![B256::repeat_byte(7)],
                raw: vec![2, 1],
                payments: vec![id],
                state: IntentState::Pending,
                created_at_ms: 1,
                updated_at_ms: 1,
            };
            pipeline
                .record_settlement(vec![IntentChange::Record(intent)], vec![Transition { id, status }])?
                .blocking_recv()
                .unwrap()
        };

        // Its waiters wake when its event is durable, not before, and
        // nobody else's do.
        use futures::FutureExt;
        let (waiter, other) = (pipeline.wait_for_payment(id), pipeline.wait_for_payment(PaymentId(B256::ZERO)));
        let (woken, not_woken) = (waiter.notified(), other.notified());
        ledger.failing.store(true, Ordering::SeqCst);
        assert!(record(PaymentState::Submitted, None).is_err());
        ledger.failing.store(false, Ordering::SeqCst);
        let mut woken = woken;
        assert!(woken.as_mut().now_or_never().is_none(), "a failed commit wakes nobody");

        // Submitted: still owed, still queued, the balance still reserved.
        record(PaymentState::Submitted, None).unwrap();
        assert!(woken.now_or_never().is_some());
        assert!(not_woken.now_or_never().is_none());
        assert_eq!(ledger.pending().unwrap().len(), 1);
        assert_eq!(ledger.intents().unwrap().len(), 1);
        assert!(matches!(submit(&pipeline, submission(&payer, 2)), SubmitOutcome::Rejected { .. }));

        // Confirmed: off the queue, reservation released, a duplicate says so.
        record(PaymentState::Confirmed, Some(42)).unwrap();
        let stored = ledger.payment(&id).unwrap().unwrap();
        assert_eq!(stored.status.state, PaymentState::Confirmed);
        assert_eq!(stored.status.block, Some(42));
        assert!(ledger.pending().unwrap().is_empty());
        let states: Vec<_> = ledger.events_after(0, 10).unwrap().iter().map(|e| e.status.state).collect();
        assert_eq!(states, [PaymentState::Queued, PaymentState::Submitted, PaymentState::Confirmed]);
        assert_eq!(*pipeline.events().borrow(), 3);
        match submit(&pipeline, first) {
            SubmitOutcome::Duplicate { status, .. } => assert_eq!(status.state, PaymentState::Confirmed),
            other => panic!("{other:?}"),
        }
        assert!(matches!(submit(&pipeline, submission(&payer, 2)), SubmitOutcome::Accepted { .. }));

        // An unknown payment is refused and nothing of the update is written.
        let unknown = Transition { id: PaymentId(B256::ZERO), status: PaymentStatus::new(PaymentState::Failed, 1) };
        let err = pipeline.record_settlement(Vec::new(), vec![unknown]).unwrap().blocking_recv().unwrap();
        assert!(matches!(err, Err(Error::UnknownPayment(_))));
        assert_eq!(ledger.last_event_sequence().unwrap(), 4);
    }

    #[test]
    fn a_recorded_payment_is_a_retry_only_with_its_key_from_its_merchant() {
        use crate::domain::IdempotencyKey;

        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        let key = IdempotencyKey::parse("pay_0123456789abcdef").unwrap();
        // Signed once each: a submit must be byte-identical to be the same payment.
        let signed: Vec<Submission> = (0..=3).map(|n| submission(&payer, n)).collect();
        let keyed = |nonce: usize| Submission { idempotency: Some(key), ..signed[nonce].clone() };
        let retried = |outcome: SubmitOutcome| matches!(outcome, SubmitOutcome::Duplicate { retry: true, .. });
        let replayed = |outcome: SubmitOutcome| matches!(outcome, SubmitOutcome::Duplicate { retry: false, .. });
        {
            let pipeline = start(&ledger, &payer, 1_000);
            assert!(matches!(submit(&pipeline, keyed(1)), SubmitOutcome::Accepted { .. }));
            assert!(retried(submit(&pipeline, keyed(1))), "same key, same payment, same merchant");
            assert!(replayed(submit(&pipeline, signed[1].clone())), "no key: a replay");
            let other_key = IdempotencyKey::parse("pay_fedcba9876543210").unwrap();
            let other = Submission { idempotency: Some(other_key), ..signed[1].clone() };
            assert!(replayed(submit(&pipeline, other)), "another key: a replay");
            let mut m2 = crate::testing::direct_merchant(PAY_TO);
            m2.id = "m2".into();
            m2.number = 2;
            let foreign = pipeline.try_submit(Arc::new(m2), keyed(1)).unwrap().blocking_recv().unwrap();
            assert!(replayed(foreign), "another merchant with the key: a replay");

            // The key with another payment is refused, and that payment is
            // neither recorded nor reserved.
            let SubmitOutcome::Rejected { rejection, id, .. } = submit(&pipeline, keyed(2)) else {
                panic!("the key names payment 1")
            };
            assert_eq!(rejection.reason, Reason::IdempotencyKeyReused);
            assert!(ledger.payment(&id.unwrap()).unwrap().is_none());
            assert!(matches!(submit(&pipeline, signed[2].clone()), SubmitOutcome::Accepted { .. }));
        }
        // After a restart: the same answers, from the ledger.
        let pipeline = start(&ledger, &payer, 1_000);
        let again = submit(&pipeline, keyed(1));
        assert!(retried(again.clone()), "{again:?}");
        assert!(replayed(submit(&pipeline, signed[1].clone())));
        let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, keyed(3)) else { panic!("still taken") };
        assert_eq!(rejection.reason, Reason::IdempotencyKeyReused);
    }

    #[test]
    fn a_ledger_stalled_under_load_recovers_and_loses_nothing() {
        use crate::domain::PaymentState;

        // Queues of two: every queue is full while the ledger stalls, and
        // settlement updates keep sending the shard answers.
        let ledger = Arc::new(FlakyLedger::default());
        let payers: Vec<Payer> = (0..4).map(|_| Payer::random()).collect();
        let config =
            PipelineConfig { verifiers: 2, shards: 1, queue_capacity: 2, max_group: 2, ..PipelineConfig::default() };
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let dyn_ledger: Arc<dyn Ledger> = ledger.clone();
        let pipeline = Arc::new(Pipeline::start(&config, &dyn_ledger, &balances).unwrap());
        let first = submission(&payers[0], 1);
        let settled: Vec<PaymentId> = std::iter::once(first.clone())
            .chain((2..=40).map(|n| submission(&payers[0], n)))
            .map(|s| match submit(&pipeline, s) {
                SubmitOutcome::Accepted { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect();
        let load: Vec<Submission> = payers[1..].iter().flat_map(|p| (1..=200).map(move |n| submission(p, n))).collect();

        let stall = ledger.stall.lock().unwrap();
        let (done_tx, done) = std::sync::mpsc::channel();
        let submitter = {
            let (pipeline, done_tx) = (pipeline.clone(), done_tx.clone());
            thread::spawn(move || {
                let mut replies = Vec::new();
                for s in load {
                    let mut s = s;
                    loop {
                        match pipeline.try_submit(merchant(), s) {
                            Ok(rx) => break replies.push(rx),
                            Err(Overloaded(back)) => {
                                s = *back;
                                thread::sleep(std::time::Duration::from_micros(200));
                            }
                        }
                    }
                }
                let outcomes: Vec<_> = replies.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect();
                done_tx.send(()).unwrap();
                outcomes
            })
        };
        let settler = {
            let pipeline = pipeline.clone();
            thread::spawn(move || {
                for id in settled {
                    let confirmed = Transition { id, status: PaymentStatus::new(PaymentState::Confirmed, 1) };
                    pipeline.record_settlement(Vec::new(), vec![confirmed]).unwrap().blocking_recv().unwrap().unwrap();
                }
                done_tx.send(()).unwrap();
            })
        };
        thread::sleep(std::time::Duration::from_millis(300));
        drop(stall);
        for _ in 0..2 {
            done.recv_timeout(std::time::Duration::from_secs(30)).expect("the pipeline deadlocked after the stall");
        }
        settler.join().unwrap();
        let outcomes = submitter.join().unwrap();

        // Every payment acknowledged is on disk; the settled ones are confirmed.
        assert_eq!(outcomes.len(), 600);
        for outcome in &outcomes {
            let SubmitOutcome::Accepted { id, .. } = outcome else { panic!("{outcome:?}") };
            assert!(ledger.payment(id).unwrap().is_some(), "acknowledged but not recorded");
        }
        assert_eq!(ledger.pending().unwrap().len(), 600);
        let replay = submit(&pipeline, first);
        assert!(matches!(replay, SubmitOutcome::Duplicate { .. }), "{replay:?}");
    }

    #[test]
    fn a_pending_intent_is_replaced_only_by_a_version_of_itself() {
        use crate::domain::{IntentState, TxIntent};

        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        let pipeline = start(&ledger, &payer, 1_000);
        let ids: Vec<PaymentId> = (1..=2)
            .map(|n| match submit(&pipeline, submission(&payer, n)) {
                SubmitOutcome::Accepted { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect();
        let intent = |payment: PaymentId, hashes: &[u8]| TxIntent {
            chain_id: 31337,
            signer: Address::repeat_byte(1),
            nonce: 5,
            tx_hashes: hashes.iter().map(|h| B256::repeat_byte(*h)).collect(),
            raw: vec![2, *hashes.last().unwrap()],
            payments: vec![payment],
            state: IntentState::Pending,
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        let record = |i: TxIntent| {
            pipeline.record_settlement(vec![IntentChange::Record(i)], Vec::new()).unwrap().blocking_recv().unwrap()
        };
        record(intent(ids[0], &[1])).unwrap();
        record(intent(ids[0], &[1, 2])).expect("a fee bump: a version of the same transaction");
        for other in [intent(ids[1], &[3]), intent(ids[0], &[4])] {
            let err = record(other).unwrap_err();
            assert!(matches!(err, Error::IntentConflict(_)), "{err}");
        }
        // Nor twice in one update (one group).
        let twice = vec![IntentChange::Record(intent(ids[0], &[1, 2])), IntentChange::Record(intent(ids[1], &[5]))];
        let err = pipeline.record_settlement(twice, Vec::new()).unwrap().blocking_recv().unwrap().unwrap_err();
        assert!(matches!(err, Error::IntentConflict(_)), "{err}");
        assert_eq!(ledger.intents().unwrap(), vec![intent(ids[0], &[1, 2])], "the pending intent was kept");
    }

    #[test]
    fn a_payment_whose_validity_ran_out_in_the_shard_queue_is_refused() {
        // One shard, queues of one: with the ledger stalled, the shard waits
        // to hand over a payment while the next one sits in its queue.
        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        let config =
            PipelineConfig { verifiers: 1, shards: 1, queue_capacity: 1, max_group: 1, ..PipelineConfig::default() };
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let dyn_ledger: Arc<dyn Ledger> = ledger.clone();
        let pipeline = Pipeline::start(&config, &dyn_ledger, &balances).unwrap();
        let now = crate::domain::unix_millis() / 1000;
        let short = {
            let s = submission(&payer, 9);
            let PaymentInput::Exact(mut payload) = s.input.clone() else { unreachable!() };
            payload = payer.sign_exact(&s.requirements, now - 60, now + 8, payload.authorization.nonce);
            Submission::new(s.requirements, PaymentInput::Exact(payload))
        };
        let enqueue = |s: Submission| {
            let mut s = s;
            loop {
                match pipeline.try_submit(merchant(), s) {
                    Ok(rx) => break rx,
                    Err(Overloaded(back)) => {
                        s = *back;
                        thread::sleep(std::time::Duration::from_millis(20));
                    }
                }
            }
        };
        let stall = ledger.stall.lock().unwrap();
        // One in the stalled commit, one in the commit queue, one the shard
        // holds: then the short one waits in the shard's queue.
        let mut replies: Vec<_> = (1..=3)
            .map(|n| {
                let rx = enqueue(submission(&payer, n));
                thread::sleep(std::time::Duration::from_millis(100));
                rx
            })
            .collect();
        let late = enqueue(short);
        thread::sleep(std::time::Duration::from_secs(9));
        drop(stall);
        let SubmitOutcome::Rejected { rejection, .. } = late.blocking_recv().unwrap() else { panic!("accepted late") };
        assert_eq!(rejection.reason, Reason::ValidBefore, "{}", rejection.message);
        for rx in replies.drain(..) {
            assert!(matches!(rx.blocking_recv().unwrap(), SubmitOutcome::Accepted { .. }));
        }
    }

    /// Every channel holds 1,000 on chain, nothing claimed.
    #[derive(Debug, Default)]
    struct FundedChannels;

    impl ChannelSource for FundedChannels {
        fn fetch(&self, v: &crate::channels::VerifiedVoucher, notify: crate::channels::ChannelNotifier) {
            let onchain = x402_channel::OnChain { balance: 1_000, total_claimed: 0, withdrawal: None, refund_nonce: 0 };
            notify(v.channel_id, Ok(onchain));
        }
        fn deposit(&self, _: &crate::channels::VerifiedVoucher, _: crate::channels::DepositNotifier) {}
    }

    /// A voucher write that fails while a later voucher of the channel is
    /// already on its way: the later one was built on the failed state and
    /// is refused too (not recorded over it), and the channel the shard
    /// and the ledger agree on takes both once they are sent again.
    #[test]
    fn a_failed_voucher_write_takes_back_the_vouchers_built_on_it() {
        use x402_channel::ChannelDomain;

        let ledger = Arc::new(FlakyLedger::default());
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let config = PipelineConfig { channels: Arc::new(FundedChannels), shards: 1, ..PipelineConfig::default() };
        let dyn_ledger: Arc<dyn Ledger> = ledger.clone();
        let pipeline = Pipeline::start(&config, &dyn_ledger, &balances).unwrap();
        let payer = Payer::random();
        let authorizer = Address::repeat_byte(0xaa);
        let domain = ChannelDomain::new(31337, config.channel_contracts.channels);
        let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
        let id = domain.channel_id(&channel);
        let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
        let voucher = |max: u128| {
            let payload = voucher_payload(&payer, &domain, &channel, authorizer, max);
            Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(payload)))
        };
        let accepted = |o: &SubmitOutcome| matches!(o, SubmitOutcome::VoucherAccepted { .. });
        assert!(accepted(&submit(&pipeline, voucher(10))));

        // The committer stalls with the second voucher; the third follows.
        let stall = ledger.stall.lock().unwrap();
        let second = pipeline.try_submit(merchant(), voucher(20)).unwrap();
        thread::sleep(std::time::Duration::from_millis(200));
        let third = pipeline.try_submit(merchant(), voucher(30)).unwrap();
        thread::sleep(std::time::Duration::from_millis(200));
        ledger.fail_next.store(1, Ordering::SeqCst);
        drop(stall);
        assert!(matches!(second.blocking_recv().unwrap(), SubmitOutcome::Unavailable(_)));
        let third = third.blocking_recv().unwrap();
        assert!(matches!(third, SubmitOutcome::Unavailable(_)), "built on a failed write, answered {third:?}");

        // Sent again, both count, once each, in the ledger as in the shard.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let second = loop {
            let answer = submit(&pipeline, voucher(20));
            if accepted(&answer) || std::time::Instant::now() > deadline {
                break answer;
            }
            thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(accepted(&second), "{second:?}");
        let SubmitOutcome::VoucherAccepted { channel: view, .. } = submit(&pipeline, voucher(30)) else {
            panic!("the third voucher, sent again")
        };
        assert_eq!(view.charged, 30);
        assert_eq!(ledger.channel(&id).unwrap().unwrap().channel.charged, 30);
    }

    /// Channel reads that never come back.
    #[derive(Debug, Default)]
    struct SilentChannels;

    impl ChannelSource for SilentChannels {
        fn fetch(&self, _: &crate::channels::VerifiedVoucher, _: crate::channels::ChannelNotifier) {}
        fn deposit(&self, _: &crate::channels::VerifiedVoucher, _: crate::channels::DepositNotifier) {}
    }

    /// Waits (up to 10 s) for `want` of `replies` to say "too many ...,
    /// retry", and takes them out; returns how many did. Any other answer
    /// fails the test.
    fn told_to_retry(replies: &mut Vec<oneshot::Receiver<SubmitOutcome>>, want: usize) -> usize {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut refused = 0;
        while refused < want && std::time::Instant::now() < deadline {
            replies.retain_mut(|rx| match rx.try_recv() {
                Ok(SubmitOutcome::Unavailable(message)) => {
                    assert!(message.contains("too many"), "{message}");
                    refused += 1;
                    false
                }
                Ok(other) => panic!("{other:?}"),
                Err(_) => true,
            });
            thread::sleep(std::time::Duration::from_millis(10));
        }
        refused
    }

    #[test]
    fn a_flood_of_vouchers_behind_one_channel_read_is_bounded() {
        use x402_channel::ChannelDomain;

        let ledger: Arc<dyn Ledger> = Arc::new(FlakyLedger::default());
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let config = PipelineConfig { channels: Arc::new(SilentChannels), ..PipelineConfig::default() };
        let pipeline = Pipeline::start(&config, &ledger, &balances).unwrap();
        let payer = Payer::random();
        let authorizer = Address::repeat_byte(0xaa);
        let domain = ChannelDomain::new(31337, config.channel_contracts.channels);
        let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
        let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
        let voucher = |max: u128| voucher_payload(&payer, &domain, &channel, authorizer, max);
        let mut replies: Vec<_> = (1..=200u128)
            .map(|n| {
                let submission =
                    Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(voucher(n * 10))));
                pipeline.try_submit(merchant(), submission).unwrap()
            })
            .collect();
        // The channel read never comes: 64 wait, the rest are told to retry.
        assert_eq!((told_to_retry(&mut replies, 136), replies.len()), (136, 64));
    }

    #[test]
    fn a_flood_of_vouchers_over_many_channels_is_bounded_per_shard() {
        use x402_channel::ChannelDomain;

        let ledger: Arc<dyn Ledger> = Arc::new(FlakyLedger::default());
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let config = PipelineConfig {
            channels: Arc::new(SilentChannels),
            shards: 1,
            max_parked: 100,
            ..PipelineConfig::default()
        };
        let pipeline = Pipeline::start(&config, &ledger, &balances).unwrap();
        let authorizer = Address::repeat_byte(0xaa);
        let domain = ChannelDomain::new(31337, config.channel_contracts.channels);
        let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
        // Four channels, 40 vouchers each: under the per-channel bound, over
        // the shard's.
        let mut replies = Vec::new();
        for _ in 0..4 {
            let payer = Payer::random();
            let channel = payer.channel_config(PAY_TO, authorizer, TOKEN, 900, B256::ZERO);
            for n in 1..=40u128 {
                let voucher = voucher_payload(&payer, &domain, &channel, authorizer, n * 10);
                let submission = Submission::new(requirements.clone(), PaymentInput::Voucher(Box::new(voucher)));
                replies.push(pipeline.try_submit(merchant(), submission).unwrap());
            }
        }
        assert_eq!((told_to_retry(&mut replies, 60), replies.len()), (60, 100));
    }

    const TOKEN: Address = address!("0x5FbDB2315678afecb367f032d93F642f64180aa3");

    /// A pipeline whose balances a test hands over by hand, with one
    /// verifier so that payments reach their shard in submit order.
    fn start_manual(ledger: &Arc<FlakyLedger>) -> (Pipeline, Arc<ManualBalances>) {
        let source = Arc::new(ManualBalances::default());
        let ledger: Arc<dyn Ledger> = ledger.clone();
        let balances: Arc<dyn BalanceSource> = source.clone();
        let config = PipelineConfig { verifiers: 1, shards: 3, ..PipelineConfig::default() };
        (Pipeline::start(&config, &ledger, &balances).unwrap(), source)
    }

    /// Returns once `payer`'s shard has handled everything submitted so far:
    /// a payment of another payer of that shard, with a known balance, is
    /// answered.
    fn drain_shard(pipeline: &Pipeline, source: &ManualBalances, payer: &Payer) {
        let other = std::iter::repeat_with(Payer::random)
            .find(|p| shard_of(p.address(), 3) == shard_of(payer.address(), 3))
            .unwrap();
        source.complete((31337, TOKEN, other.address()), &Ok(Account::Funds(U256::MAX)));
        assert!(matches!(submit(pipeline, submission(&other, 1)), SubmitOutcome::Accepted { .. }));
    }

    /// A settled payment's reservation is released only once the balance
    /// source has read the payer's balance after the settlement: a cached
    /// balance from before still holds the settled tokens, and releasing
    /// at once would let the payer spend them twice.
    #[test]
    fn a_settled_payment_is_reserved_until_the_balance_is_read_again() {
        use crate::domain::PaymentState;
        let ledger = Arc::new(FlakyLedger::default());
        let (pipeline, source) = start_manual(&ledger);
        let payer = Payer::random();
        let key = (31337, TOKEN, payer.address());
        source.complete(key, &Ok(Account::Funds(U256::from(100))));
        let SubmitOutcome::Accepted { id, .. } = submit(&pipeline, submission(&payer, 1)) else { panic!("accepted") };

        // Settled on chain: the payer's 100 left, but the cache says 100.
        let mut status = PaymentStatus::new(PaymentState::Confirmed, 1);
        status.transaction = Some(B256::repeat_byte(7));
        pipeline
            .record_settlement(Vec::new(), vec![Transition { id, status }])
            .unwrap()
            .blocking_recv()
            .unwrap()
            .unwrap();
        let refused = |n| match submit(&pipeline, submission(&payer, n)) {
            SubmitOutcome::Rejected { rejection, .. } => rejection.reason == Reason::InsufficientBalance,
            other => panic!("{other:?}"),
        };
        assert!(refused(2), "the settled tokens counted again before the balance was read");
        // The read after the settlement: 0 left, and the reservation goes.
        source.complete(key, &Ok(Account::Funds(U256::ZERO)));
        drain_shard(&pipeline, &source, &payer);
        assert!(refused(3));
        // A top-up: the payer may pay again.
        source.complete(key, &Ok(Account::Funds(U256::from(100))));
        assert!(matches!(submit(&pipeline, submission(&payer, 4)), SubmitOutcome::Accepted { .. }));
    }

    #[test]
    fn payments_wait_for_an_unknown_balance_and_resume_in_order() {
        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        let key = (31337, TOKEN, payer.address());
        let (pipeline, source) = start_manual(&ledger);
        let first = submission(&payer, 1);
        let queue = [first.clone(), first, submission(&payer, 2), submission(&payer, 3)];
        let mut replies: Vec<_> = queue.into_iter().map(|s| pipeline.try_submit(merchant(), s).unwrap()).collect();
        drain_shard(&pipeline, &source, &payer);
        assert_eq!(source.waiting(), [key], "one lookup; the later payments wait behind the first");
        assert!(replies.iter_mut().all(|rx| rx.try_recv().is_err()), "nothing is answered before the balance");

        // Room for two payments of 100, taken in arrival order.
        source.complete(key, &Ok(Account::Funds(U256::from(250))));
        let outcomes: Vec<_> = replies.into_iter().map(|rx| rx.blocking_recv().unwrap()).collect();
        assert!(matches!(outcomes[0], SubmitOutcome::Accepted { .. }), "{outcomes:?}");
        assert!(matches!(outcomes[1], SubmitOutcome::Duplicate { .. }), "{outcomes:?}");
        assert!(matches!(outcomes[2], SubmitOutcome::Accepted { .. }), "{outcomes:?}");
        let SubmitOutcome::Rejected { rejection, .. } = &outcomes[3] else { panic!("{outcomes:?}") };
        assert_eq!(rejection.reason, Reason::InsufficientBalance);

        // Known from now on: answered at once, nothing fetched.
        let SubmitOutcome::Rejected { rejection, .. } = submit(&pipeline, submission(&payer, 4)) else {
            panic!("the balance is used up");
        };
        assert_eq!(rejection.reason, Reason::InsufficientBalance);
        assert!(source.waiting().is_empty());
    }

    #[test]
    fn a_failed_fetch_answers_the_waiting_payments_unavailable() {
        let ledger = Arc::new(FlakyLedger::default());
        let payer = Payer::random();
        let key = (31337, TOKEN, payer.address());
        let (pipeline, source) = start_manual(&ledger);
        let first = submission(&payer, 1);
        let replies = [first.clone(), submission(&payer, 2)].map(|s| pipeline.try_submit(merchant(), s).unwrap());
        drain_shard(&pipeline, &source, &payer);
        let down = Arc::new(Error::Io(std::io::Error::other("node down")));
        source.complete(key, &Err(down));
        for rx in replies {
            match rx.blocking_recv().unwrap() {
                SubmitOutcome::Unavailable(message) => assert!(message.contains("node down"), "{message}"),
                other => panic!("{other:?}"),
            }
        }

        // Nothing was recorded or reserved: the same payment passes once the
        // balance is read, on a new lookup.
        let reply = pipeline.try_submit(merchant(), first).unwrap();
        drain_shard(&pipeline, &source, &payer);
        assert_eq!(source.waiting(), [key]);
        source.complete(key, &Ok(Account::Funds(U256::from(100))));
        assert!(matches!(reply.blocking_recv().unwrap(), SubmitOutcome::Accepted { .. }));

        // A payment still waiting at shutdown is answered, not dropped.
        let late = Payer::random();
        let reply = pipeline.try_submit(merchant(), submission(&late, 1)).unwrap();
        drain_shard(&pipeline, &source, &late);
        pipeline.shutdown();
        assert!(matches!(reply.blocking_recv().unwrap(), SubmitOutcome::Unavailable(_)));
    }
}
