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
mod verifier;
mod waiters;

pub use self::waiters::{PaymentWaiters, Waiter};

use std::{
    collections::HashMap,
    sync::Arc,
    thread::{self, JoinHandle},
};

use alloy::primitives::Address;
// `queue`, not `channel`: in this crate a channel is a payment channel.
use crossbeam::channel::{self as queue, Sender, TrySendError};
use tokio::sync::{oneshot, watch};

use self::{
    committer::Committer,
    messages::{CommitItem, ShardMsg},
    shard::Shard,
    verifier::{run_verifier, shard_of, shard_of_channel},
};
use crate::{
    Error, Result,
    balance::BalanceSource,
    channels::{ChannelContracts, ChannelSource, ChannelTerms, ChannelView, NoChannels, VoucherVerifier},
    domain::{Clock, Merchant, PaymentId, PaymentStatus, Submission},
    ledger::Ledger,
    reason::{InvalidField, Rejection},
    verify::{MinValidity, Refusal, Verifier},
};

/// Pipeline sizing.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// Where the stages read the time: the system clock but in tests.
    pub clock: Clock,
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
    /// The `batch-settlement` contracts vouchers and deposits are signed
    /// for, on any chain, when `channel_chains` is `None`.
    pub channel_contracts: ChannelContracts,
    /// The chains `batch-settlement` channels are served on, each with its
    /// contracts, least deposit and the receiver authorizer x402d claims
    /// with (vouchers of channels naming another are refused); a voucher on
    /// another chain is refused. `None`: any chain, on `channel_contracts`.
    pub channel_chains: Option<Vec<(u64, ChannelTerms)>>,
    /// Where unknown channels' on-chain state is read from (and deposits
    /// are put on chain), for every chain.
    pub channels: Arc<dyn ChannelSource>,
    /// Per shard: most payments waiting for a balance read, and most
    /// vouchers waiting for a channel read or deposit; beyond, submits are
    /// answered UNAVAILABLE.
    pub max_parked: usize,
    /// The chains payments are settled on; a payment on another network is
    /// refused (`invalid_network`). `None`: record only, any network.
    pub settled_chains: Option<Vec<u64>>,
    /// Proves the signatures of payers with code.
    pub signatures: Arc<dyn crate::signature::SignatureSource>,
    /// The factories whose ERC-6492 (counterfactual wallet) signatures are
    /// accepted, with the chain of each.
    pub erc6492_factories: Vec<(u64, Address)>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            clock: Clock::system(),
            verifiers: 0,
            shards: 2,
            queue_capacity: 65_536,
            max_group: 4096,
            min_validity: MinValidity::default(),
            replay_retention_secs: 300,
            channel_contracts: ChannelContracts::default(),
            channel_chains: None,
            channels: Arc::new(NoChannels),
            max_parked: 65_536,
            settled_chains: None,
            signatures: Arc::new(crate::signature::NoSignatures),
            erc6492_factories: Vec::new(),
        }
    }
}

/// What a submit came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SubmitOutcome {
    /// Verified and durably recorded.
    Accepted {
        /// The payment's id.
        id: PaymentId,
        /// Who paid (the authorization's `from`).
        payer: Address,
        /// Where it stands: `Accepted` or, for a policy that queues at once,
        /// `Queued`.
        status: PaymentStatus,
    },
    /// The same payment was accepted before; this is where it stands. It is
    /// paid for already: whatever it paid for must not be served again,
    /// unless `retry`: the submit carried the idempotency key the original
    /// was accepted with, from the same merchant (a retry of a request
    /// whose answer was lost).
    Duplicate {
        /// The payment's id.
        id: PaymentId,
        /// Who paid.
        payer: Address,
        /// Where the recorded payment stands now.
        status: PaymentStatus,
        /// The submit is the original's retry (same merchant, same key).
        retry: bool,
    },
    /// A verification rule failed.
    Rejected {
        /// The payment's id, once the checks got far enough to compute it.
        id: Option<PaymentId>,
        /// Who signed, once known.
        payer: Option<Address>,
        /// The rule that failed, with its reason code.
        rejection: Rejection,
    },
    /// The request is malformed.
    Invalid(InvalidField),
    /// The ledger could not record it; nothing was accepted. Retryable.
    Unavailable(String),
    /// Checked only (a dry run): it would be accepted. Nothing was reserved
    /// or recorded.
    Verified {
        /// The payment's id.
        id: PaymentId,
        /// Who paid.
        payer: Address,
    },
    /// A voucher was verified and the channel's new charged total recorded
    /// (for a dry run: would be, and `channel` is as it stands).
    VoucherAccepted {
        /// The channel's payer.
        payer: Address,
        /// The channel after the voucher.
        channel: ChannelView,
    },
    /// A voucher failed a rule; `channel` is the channel's state when it is
    /// known, so the client can resynchronise.
    VoucherRejected {
        /// The channel's payer, once known.
        payer: Option<Address>,
        /// The rule that failed, with its reason code.
        rejection: Rejection,
        /// The channel as it stands, when known.
        channel: Option<ChannelView>,
    },
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
    /// The payment.
    pub id: PaymentId,
    /// Its new status.
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
/// [`ChangedChannels::take`] of their chain: the committer adds a group's
/// channel ids once it is durable, so a reader of those records sees what
/// was committed and nothing that a failed commit left in a shard. Each
/// chain's claims keep their view of its channels current with it instead
/// of reading them all each round; one chain's take leaves the others'
/// channels for them. Sets, so they stay as large as the channels at most,
/// however long nobody takes them; one lock per group commit, not per
/// voucher.
#[derive(Debug, Default)]
pub struct ChangedChannels {
    ids: std::sync::Mutex<HashMap<u64, std::collections::HashSet<alloy::primitives::B256>>>,
}

impl ChangedChannels {
    /// Adds `ids` (after they are durable), each with its chain.
    pub fn add(&self, ids: impl IntoIterator<Item = (u64, alloy::primitives::B256)>) {
        let mut ids = ids.into_iter().peekable();
        if ids.peek().is_some() {
            let mut changed = self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            for (chain_id, id) in ids {
                changed.entry(chain_id).or_default().insert(id);
            }
        }
    }

    /// The ids of `chain_id`'s channels changed since its last call.
    pub fn take(&self, chain_id: u64) -> std::collections::HashSet<alloy::primitives::B256> {
        self.ids.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&chain_id).unwrap_or_default()
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

        let (verify_tx, verify_rx) = queue::bounded::<VerifyJob>(cap);
        let (commit_tx, commit_rx) = queue::bounded::<CommitItem>(cap);
        let (commit_control, commit_control_rx) = queue::unbounded::<CommitItem>();
        let mut shard_txs = Vec::with_capacity(shards);
        let mut shard_rxs = Vec::with_capacity(shards);
        let mut shard_controls = Vec::with_capacity(shards);
        for _ in 0..shards {
            let (tx, rx) = queue::bounded::<ShardMsg>(cap);
            let (control, control_rx) = queue::unbounded::<ShardMsg>();
            shard_txs.push(tx);
            shard_controls.push(control);
            shard_rxs.push((rx, control_rx));
        }

        // Rebuild state from the ledger before any thread runs.
        let now = config.clock.now_secs();
        let mut shard_states: Vec<Shard> = (0..shards)
            .map(|i| {
                let control = shard_controls[i].clone();
                Shard::new(i, balances.clone(), control, commit_tx.clone(), config.replay_retention_secs)
                    .with_channels(config.channels.clone())
                    .with_max_parked(config.max_parked)
                    .with_clock(config.clock.clone())
                    .with_signatures(config.signatures.clone())
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
                .with_key_retention(config.replay_retention_secs)
                .with_clock(config.clock.clone());
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
            let clock = config.clock.clone();
            let mut verifier = Verifier::new(config.min_validity)
                .settling(config.settled_chains.clone())
                .with_factories(config.erc6492_factories.clone());
            let mut vouchers = VoucherVerifier::new(config.channel_contracts)
                .settling(config.settled_chains.clone())
                .on_chains(config.channel_chains.clone());
            pipeline.verifier_threads.push(spawn(format!("x402d-verify-{i}"), &died, move || {
                run_verifier(&mut verifier, &mut vouchers, &rx, &shard_txs, &clock);
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

    /// The sequence number of the last committed settlement event, watched:
    /// it changes after every commit that records one.
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

/// Keys of the settlement queue, by strategy, for the queue-depth gauge.
pub(crate) fn pending_gauge(strategy: &'static str, depth: usize) {
    metrics::gauge!(crate::metrics::SETTLEMENT_QUEUE_DEPTH, "strategy" => strategy).set(depth as f64);
}

#[cfg(test)]
mod tests;
