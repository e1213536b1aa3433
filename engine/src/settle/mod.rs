//! Settlement: taking queued payments on chain by their merchant's strategy.
//!
//! One [`Settler`] per chain runs a loop over the ledger:
//!
//! 1. Transaction intents. A `Pending` intent not being followed (left by a
//!    crash, or whose receipt did not come in time) is resolved: a receipt of
//!    any of its versions concludes it, otherwise its signed bytes are sent
//!    again and followed. An `Included` intent is watched for reorgs until
//!    it is buried [`SettlerConfig::finality_depth`] blocks deep, then
//!    forgotten.
//! 2. The settlement queue, earliest deadline first: `direct` payments get a
//!    `transferWithAuthorization` transaction each; `batched` payments
//!    gather per token into Multicall3 `aggregate3` transactions (see
//!    [`batched`]).
//!
//! Every chain action is recorded through the pipeline's committer before it
//! happens: the intent with its signed bytes and `Submitted` before the
//! broadcast (and before a fee-bumped replacement), then `Confirmed`,
//! `Failed` or `Expired` with the receipt. A transaction waiting longer than
//! [`SettlerConfig::stuck_after`] is replaced by a fee-bumped version at the
//! same nonce; the intent keeps every version's hash, and whichever is mined
//! concludes it.

pub mod batched;
mod claims;
mod direct;
mod track;

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    time::Duration,
};

use alloy::primitives::{Address, B256, Bytes};
use tokio::task::JoinSet;
use x402_chain::{
    Chain,
    contracts::MULTICALL3_ADDRESS,
    eip3009::{transfer_with_authorization_bytes_calldata, transfer_with_authorization_calldata},
    signature::Erc6492,
};

use crate::{
    Engine, Result,
    domain::{
        Clock, IntentState, PaymentId, PaymentRecord, PaymentState, PaymentStatus, SettlementPolicy, SignatureKind,
        TxIntent,
    },
    pipeline::{IntentChange, Transition},
    reason::Reason,
};

pub use self::claims::{ClaimRound, ClaimsConfig};

/// The settler's tasks, and the payments (or claim markers) each works on:
/// a task that ends, even by panicking, gives its payments back, and the
/// next round takes them up again from the ledger.
#[derive(Default)]
struct Work {
    tasks: JoinSet<()>,
    owners: HashMap<tokio::task::Id, Vec<PaymentId>>,
    in_flight: HashSet<PaymentId>,
}

impl Work {
    /// Runs `task` on `ids`, which no other task takes up meanwhile.
    fn spawn(&mut self, ids: Vec<PaymentId>, task: impl Future<Output = ()> + Send + 'static) {
        self.in_flight.extend(ids.iter().copied());
        let handle = self.tasks.spawn(task);
        self.owners.insert(handle.id(), ids);
    }

    /// Gives back the payments of every task that ended.
    fn reap(&mut self) {
        while let Some(done) = self.tasks.try_join_next_with_id() {
            let id = match done {
                Ok((id, ())) => id,
                Err(err) => {
                    if err.is_panic() {
                        tracing::error!(%err, "a settlement task panicked; its payments are taken up again");
                    }
                    err.id()
                }
            };
            for payment in self.owners.remove(&id).unwrap_or_default() {
                self.in_flight.remove(&payment);
            }
        }
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn contains(&self, id: &PaymentId) -> bool {
        self.in_flight.contains(id)
    }
}

/// The longest pause between settlement rounds while attempts keep
/// failing. Short, so that no payment misses its deadline for it: a direct
/// payment accepted with the least validity its strategy allows (6 s, of
/// which 3 s are the expiry margin) still gets several attempts, and a
/// batch due 20 s before its deadline many.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Rounds in a row whose attempts failed for a retryable reason (the node
/// down, rate limits, timeouts) with none succeeding, and the pause they
/// call for: the poll doubled per such round up to [`MAX_BACKOFF`], back to
/// the poll after a round in which an attempt succeeded. Counted per round,
/// not per attempt, so that many failing payments lengthen it no faster
/// than one: a dead node costs an attempt a second per payment, not ten.
#[derive(Debug, Default)]
struct Backoff {
    rounds: AtomicU32,
    failed: AtomicBool,
    succeeded: AtomicBool,
}

impl Backoff {
    /// Counts an attempt's `result` for the round under way: a success, or
    /// a retryable failure (an error of the payment's own counts as
    /// neither).
    fn record<T>(&self, result: &Result<T>) {
        match result {
            Ok(_) => self.succeeded.store(true, Ordering::Relaxed),
            Err(err) if err.is_retryable() => self.failed.store(true, Ordering::Relaxed),
            Err(_) => {}
        }
    }

    /// Counts only a failure of `result`: for steps whose success says
    /// nothing of the chain (reading the ledger).
    fn record_failure<T>(&self, result: &Result<T>) {
        if result.is_err() {
            self.record(result);
        }
    }

    /// Ends a round; how long to wait before the next.
    fn end_round(&self, poll: Duration) -> Duration {
        let failed = self.failed.swap(false, Ordering::Relaxed);
        if self.succeeded.swap(false, Ordering::Relaxed) {
            self.rounds.store(0, Ordering::Relaxed);
        } else if failed {
            self.rounds.fetch_add(1, Ordering::Relaxed);
        }
        let rounds = self.rounds.load(Ordering::Relaxed).min(16);
        poll.saturating_mul(1 << rounds).min(MAX_BACKOFF.max(poll))
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Stands for a claim intent (which settles no payment) in the set of
/// intents being worked on.
fn claim_marker(intent: &TxIntent) -> PaymentId {
    let key = intent.key();
    PaymentId(alloy::primitives::keccak256(
        [&key.chain_id.to_be_bytes()[..], key.signer.as_slice(), &key.nonce.to_be_bytes()].concat(),
    ))
}

/// The reason for a failure no more specific reason explains.
pub(crate) const SIMULATION_FAILED: &str = "invalid_exact_evm_transaction_simulation_failed";

/// How a settler paces itself.
#[derive(Clone, Debug)]
pub struct SettlerConfig {
    /// Where the settler reads the time: the system clock but in tests.
    pub clock: Clock,
    /// How often the ledger's intents and settlement queue are looked at.
    pub poll: Duration,
    /// Transactions (direct or batch) being worked on at once.
    pub max_in_flight: usize,
    /// How long one attempt follows a transaction before leaving it
    /// `Pending` for the next round.
    pub receipt_timeout: Duration,
    /// A payment with less validity left than this is not sent: `Expired`.
    pub expiry_margin_secs: u64,
    /// A transaction not mined after this long is replaced by a fee bump.
    pub stuck_after: Duration,
    /// Fee bumps per transaction at most.
    pub max_bumps: u32,
    /// Blocks on top of an included transaction before a reorg is no
    /// longer looked for and its intent is forgotten.
    pub finality_depth: u64,
    /// The Multicall3 contract batches go through.
    pub multicall: Address,
    /// A batch is sent once its earliest `validBefore` is this close.
    pub batch_deadline_margin_secs: u64,
    /// A latest block that stays the latest this long is a chain making no
    /// blocks (on demand, or halted): its time says nothing of the time.
    pub idle_head: Duration,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        Self {
            clock: Clock::system(),
            idle_head: Duration::from_secs(300),
            poll: Duration::from_millis(100),
            max_in_flight: 64,
            receipt_timeout: Duration::from_secs(120),
            expiry_margin_secs: 3,
            stuck_after: Duration::from_secs(30),
            max_bumps: 5,
            finality_depth: 64,
            multicall: MULTICALL3_ADDRESS,
            batch_deadline_margin_secs: 20,
        }
    }
}

/// Settles the queued payments of one chain.
#[derive(Debug)]
pub struct Settler<C> {
    engine: Arc<Engine>,
    chain: Arc<C>,
    config: SettlerConfig,
    /// Gas per batch row, from the last batch estimate.
    row_gas: AtomicU64,
    /// The chain's block gas limit, once read (0 before).
    block_gas_limit: AtomicU64,
    /// The latest block time the expiry check saw, and when it first saw it
    /// (a head that stays for [`SettlerConfig::idle_head`] is a chain
    /// making no blocks).
    head_seen: std::sync::Mutex<Option<(u64, std::time::Instant)>>,
    /// When each signer's nonces were last looked at for gaps.
    gaps_checked: std::sync::Mutex<HashMap<Address, std::time::Instant>>,
    /// A channel claim is being sent and followed by the claims task.
    claiming: AtomicBool,
    /// Paces the rounds while the chain fails.
    backoff: Backoff,
    /// Batched payments whose payer held code when its batch was formed:
    /// they settle alone (in memory: a restart finds them again).
    alone: std::sync::Mutex<HashSet<PaymentId>>,
    /// Payers with code whose own settlement ran out of gas: how many
    /// times each was sent again (in memory: a restart allows as many more).
    out_of_gas: std::sync::Mutex<HashMap<PaymentId, u32>>,
}

/// How many times a payment of a payer with code is sent again after its
/// own transaction ran out of gas, before it fails.
const OUT_OF_GAS_RETRIES: u32 = 2;

/// How far the latest block's timestamp may trail the true time on a
/// chain making blocks (a slot or two, and the node's delay), in seconds.
/// A clock ahead of the head by more than this has been stepped ahead.
const HEAD_LAG: u64 = 30;

impl<C: Chain> Settler<C> {
    /// Unix time in milliseconds, by the settler's clock.
    fn now_ms(&self) -> u64 {
        self.config.clock.now_ms()
    }

    /// Whether `valid_before` leaves `margin` seconds or less. By the
    /// settler's clock, unless that clock leads the chain's latest block by
    /// more than a block's lag can explain ([`HEAD_LAG`]) while the chain
    /// makes blocks: a clock stepped ahead (an NTP correction, a resumed
    /// virtual machine) then counts from the head plus that lag, and does
    /// not give up a payment the chain would still take, however far ahead
    /// it is. A head that has not changed for [`SettlerConfig::idle_head`]
    /// (a chain making blocks on demand, or halted) says nothing of the
    /// time: the clock counts. The chain is asked only when the clock says expired;
    /// `chain_time` keeps its answer for the round.
    async fn expired(&self, valid_before: u64, margin: u64, chain_time: &mut Option<u64>) -> Result<bool> {
        let clock = self.config.clock.now_secs();
        if valid_before > clock.saturating_add(margin) {
            return Ok(false);
        }
        let head = match *chain_time {
            Some(head) => head,
            None => *chain_time.insert(self.chain.head_time().await?),
        };
        let idle = {
            let mut seen = self.head_seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            match *seen {
                Some((time, since)) if time == head => since.elapsed() >= self.config.idle_head,
                _ => {
                    *seen = Some((head, std::time::Instant::now()));
                    false
                }
            }
        };
        let now = if idle { clock } else { clock.min(head.saturating_add(HEAD_LAG)) };
        Ok(valid_before <= now.saturating_add(margin))
    }

    /// A status stamped now, by the settler's clock.
    fn status(&self, state: PaymentState) -> PaymentStatus {
        PaymentStatus::new(state, self.now_ms())
    }

    /// `state` with the transaction that led to it, stamped now.
    fn status_with_tx(&self, state: PaymentState, tx: B256, block: Option<u64>) -> PaymentStatus {
        PaymentStatus { transaction: Some(tx), block, ..self.status(state) }
    }

    fn new(engine: Arc<Engine>, chain: Arc<C>, config: SettlerConfig) -> Self {
        Self {
            engine,
            chain,
            config,
            row_gas: AtomicU64::new(batched::INITIAL_ROW_GAS),
            block_gas_limit: AtomicU64::new(0),
            head_seen: std::sync::Mutex::default(),
            gaps_checked: std::sync::Mutex::default(),
            claiming: AtomicBool::new(false),
            backoff: Backoff::default(),
            alone: std::sync::Mutex::default(),
            out_of_gas: std::sync::Mutex::default(),
        }
    }

    /// Starts settling in the background until the handle is aborted; with
    /// `claims`, channels are claimed too (stopped with the handle).
    pub fn spawn(
        engine: Arc<Engine>,
        chain: Arc<C>,
        config: SettlerConfig,
        claims: Option<ClaimsConfig>,
    ) -> tokio::task::JoinHandle<()> {
        let settler = Arc::new(Self::new(engine, chain, config));
        tokio::spawn(async move {
            let claims = claims.map(|c| tokio::spawn(settler.clone().run_claims(c)));
            // Aborting this task drops the guard, which stops the claims.
            let _claims = claims.map(|h| AbortOnDrop(h.abort_handle()));
            settler.run().await;
        })
    }

    /// Raises each signer's next nonce past its pending intents, so that a
    /// restart (whose node may never have seen an intent's transaction)
    /// does not hand the same nonce to a new one, and fills the nonces below
    /// them that no intent holds ([`Chain::fill_gaps`]). Run at start.
    pub(crate) async fn floor_nonces(&self) -> Result<()> {
        for (signer, (nonces, _)) in self.pending_nonces(&self.engine.intents().await?) {
            let next = nonces.iter().max().map_or(0, |n| n + 1);
            self.chain.floor_nonce(signer, next).await?;
            // A nonce below a recorded one that no intent holds was signed
            // and never sent (by a process that stopped in between).
            self.fill_gaps(signer, next, &nonces).await;
        }
        Ok(())
    }

    /// Each signer's pending intents on this chain: their nonces, and
    /// whether one has waited unmined for twice
    /// [`SettlerConfig::stuck_after`].
    fn pending_nonces(&self, intents: &[TxIntent]) -> HashMap<Address, (Vec<u64>, bool)> {
        let now = self.now_ms();
        let stuck_ms = u64::try_from(self.config.stuck_after.as_millis()).unwrap_or(u64::MAX).saturating_mul(2);
        let mut held: HashMap<Address, (Vec<u64>, bool)> = HashMap::new();
        for i in intents.iter().filter(|i| i.chain_id == self.chain.chain_id() && i.state == IntentState::Pending) {
            let entry = held.entry(i.signer).or_default();
            entry.0.push(i.nonce);
            entry.1 |= now.saturating_sub(i.updated_at_ms) >= stuck_ms;
        }
        held
    }

    /// [`Chain::fill_gaps`] below `below`, what it did logged.
    async fn fill_gaps(&self, signer: Address, below: u64, held: &[u64]) {
        match self.chain.fill_gaps(signer, below, held).await {
            Ok(0) => {}
            Ok(filled) => tracing::warn!(%signer, filled, below, "filled nonces left unsent below pending intents"),
            Err(err) => tracing::warn!(%signer, %err, "could not fill the nonces left unsent below pending intents"),
        }
    }

    async fn run(self: Arc<Self>) {
        while let Err(err) = self.floor_nonces().await {
            tracing::warn!(%err, "reading the pending intents' nonces failed; will retry");
            tokio::time::sleep(self.config.poll).await;
        }
        let mut work = Work::default();
        // Payments this settler does not handle (other strategy or chain).
        let mut not_mine = HashSet::new();
        let mut watched_head = None;
        loop {
            work.reap();
            // A round's success says little of the chain (it mostly reads
            // the ledger): the attempts it starts count successes.
            let intents = self.intents_round(&mut work, &mut watched_head).await;
            self.backoff.record_failure(&intents);
            if let Err(err) = intents {
                tracing::warn!(%err, "looking at transaction intents failed; will retry");
            }
            let queue = self.queue_round(&mut work, &mut not_mine).await;
            self.backoff.record_failure(&queue);
            if let Err(err) = queue {
                tracing::warn!(%err, "reading the settlement queue failed; will retry");
            }
            tokio::time::sleep(self.backoff.end_round(self.config.poll)).await;
        }
    }

    /// Resolves pending intents nobody follows and, when the head moved,
    /// checks included ones for reorgs.
    /// Fills the gaps below a signer's pending intents that have waited
    /// unmined for twice [`SettlerConfig::stuck_after`] (at most once per
    /// that long per signer): a transaction without an intent whose nonce
    /// was never sent, and whose filler failed too (the node was down),
    /// would hold them up for ever. A transaction of this process still
    /// being sent at such a nonce fails on the filler's nonce and is asked
    /// again by its client; nothing recorded is filled over.
    async fn fill_stuck_gaps(&self, intents: &[TxIntent]) {
        for (signer, (nonces, stuck)) in self.pending_nonces(intents) {
            let due = {
                let mut checked = self.gaps_checked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let due = stuck && checked.get(&signer).is_none_or(|at| at.elapsed() >= self.config.stuck_after);
                if due {
                    checked.insert(signer, std::time::Instant::now());
                }
                due
            };
            if due {
                let below = nonces.iter().copied().min().unwrap_or(0);
                self.fill_gaps(signer, below, &nonces).await;
            }
        }
    }

    async fn intents_round(self: &Arc<Self>, work: &mut Work, watched_head: &mut Option<B256>) -> Result<()> {
        let intents = self.engine.intents().await?;
        self.fill_stuck_gaps(&intents).await;
        let mut included = Vec::new();
        for intent in intents {
            if intent.chain_id != self.chain.chain_id() || intent.payments.iter().any(|id| work.contains(id)) {
                continue;
            }
            // A channel claim settles no payment: a marker stands for it.
            let marker = intent.payments.is_empty().then(|| claim_marker(&intent));
            if marker.is_some_and(|m| work.contains(&m)) {
                continue;
            }
            match intent.state {
                IntentState::Pending => {
                    if marker.is_some() && self.claiming.load(Ordering::Acquire) {
                        continue;
                    }
                    let ids = intent.payments.iter().copied().chain(marker).collect();
                    let this = self.clone();
                    work.spawn(ids, async move {
                        let resolved = this.resolve(intent).await;
                        this.backoff.record(&resolved);
                        if let Err(err) = resolved {
                            tracing::warn!(%err, "resolving a transaction intent failed; will retry");
                        }
                    });
                }
                IntentState::Included { .. } => included.push(intent),
                // Left by an older version: its payments were dealt with.
                IntentState::Abandoned => self.forget(&intent).await?,
            }
        }
        if included.is_empty() {
            return Ok(());
        }
        // A reorg may keep the head's number: compare hashes.
        let head = self.chain.block_number().await?;
        let head_hash = self.chain.block_hash(head).await?;
        if *watched_head == head_hash {
            return Ok(());
        }
        let mut hashes = HashMap::new();
        for intent in included {
            let IntentState::Included { block, block_hash, .. } = intent.state else { continue };
            let canonical = match hashes.get(&block) {
                Some(hash) => *hash,
                None => {
                    let hash = self.chain.block_hash(block).await?;
                    hashes.insert(block, hash);
                    hash
                }
            };
            if canonical != Some(block_hash) {
                let marker = intent.payments.is_empty().then(|| claim_marker(&intent));
                let ids = intent.payments.iter().copied().chain(marker).collect();
                let this = self.clone();
                work.spawn(ids, async move {
                    let settled = this.reorged(intent).await;
                    this.backoff.record(&settled);
                    if let Err(err) = settled {
                        tracing::warn!(%err, "re-settling after a reorg failed; will retry");
                    }
                });
            } else if head >= block + self.config.finality_depth {
                self.forget(&intent).await?;
            }
        }
        *watched_head = head_hash;
        Ok(())
    }

    /// Starts settling queued payments of this chain, earliest deadline
    /// first: each `direct` one on its own, `batched` ones per token once a
    /// batch is due.
    async fn queue_round(self: &Arc<Self>, work: &mut Work, not_mine: &mut HashSet<PaymentId>) -> Result<()> {
        // A round can start at most `max_in_flight` tasks of at most a
        // block's worth of rows each: past what is in flight or not ours,
        // no more of a merchant's queue than that can matter now.
        let gas_cap_rows = self.gas_cap_rows().await;
        let rows = gas_cap_rows.as_ref().map_or(1_000, |&rows| rows);
        let head = work.in_flight.len() + not_mine.len() + self.config.max_in_flight * rows;
        let mut queue = self.engine.settlement_queue_head(head).await?;
        queue.sort_by_key(|k| (k.deadline, k.id));
        let queued: HashSet<PaymentId> = queue.iter().map(|k| k.id).collect();
        not_mine.retain(|id| queued.contains(id));
        self.alone.lock().unwrap_or_else(std::sync::PoisonError::into_inner).retain(|id| queued.contains(id));
        let mut batches: HashMap<Address, Vec<PaymentRecord>> = HashMap::new();
        for key in queue {
            if work.contains(&key.id) || not_mine.contains(&key.id) {
                continue;
            }
            let Some(record) = self.engine.payment(key.id).await? else { continue };
            if record.chain_id != self.chain.chain_id() || matches!(record.policy, SettlementPolicy::Channel { .. }) {
                not_mine.insert(key.id);
                continue;
            }
            if record.status.state != PaymentState::Queued {
                // Submitted: its intent is resolved above.
                continue;
            }
            // A payer with code settles alone, whatever its merchant's
            // strategy: its wallet's check runs code, and in a batch a hostile
            // one could burn the gas of the rows after it.
            let alone = matches!(record.policy, SettlementPolicy::Direct)
                || (matches!(record.policy, SettlementPolicy::Batched { .. })
                    && (record.signature_kind != SignatureKind::Ecdsa
                        || self.alone.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&record.id)));
            match record.policy {
                _ if alone && work.len() < self.config.max_in_flight => {
                    let this = self.clone();
                    work.spawn(vec![key.id], async move {
                        let id = record.id;
                        let settled = this.settle_direct(record).await;
                        this.backoff.record(&settled);
                        if let Err(err) = settled {
                            tracing::warn!(%err, payment = %id, "settlement attempt failed; will retry");
                        }
                    });
                }
                SettlementPolicy::Batched { .. } if !alone => batches.entry(record.asset).or_default().push(record),
                _ => {}
            }
        }
        if batches.is_empty() {
            return Ok(());
        }
        let gas_cap_rows = gas_cap_rows?;
        let now_ms = self.now_ms();
        for (token, mut rows) in batches {
            while let Some(take) = self.batch_due(&rows, now_ms, gas_cap_rows) {
                if work.len() >= self.config.max_in_flight {
                    return Ok(());
                }
                let rest = rows.split_off(take.min(rows.len()));
                let mut batch = std::mem::replace(&mut rows, rest);
                // A payer that holds code now (an EOA delegated since it
                // paid) has its wallet asked by the token, which may burn the
                // gas of the rows after it: its rows settle alone, from the
                // next round on (so that no task holds them meanwhile).
                let payers: Vec<Address> =
                    batch.iter().map(|r| r.authorization.from).collect::<HashSet<_>>().into_iter().collect();
                let with_code = self.payers_with_code(&payers).await?;
                if !with_code.is_empty() {
                    let mut alone = self.alone.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    batch.retain(|row| {
                        let code = with_code.contains(&row.authorization.from);
                        if code {
                            alone.insert(row.id);
                        }
                        !code
                    });
                }
                if batch.is_empty() {
                    if rows.is_empty() {
                        break;
                    }
                    continue;
                }
                let ids: Vec<_> = batch.iter().map(|r| r.id).collect();
                let this = self.clone();
                work.spawn(ids, async move {
                    let settled = this.settle_batch(token, batch).await;
                    this.backoff.record(&settled);
                    if let Err(err) = settled {
                        tracing::warn!(%err, %token, "settling a batch failed; will retry");
                    }
                });
                if rows.is_empty() {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Whether payment `id` (a payer with code whose transaction ran out of
    /// gas) may be sent again; counts the retry.
    fn retry_out_of_gas(&self, id: PaymentId) -> bool {
        let mut retries = self.out_of_gas.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if retries.len() > 100_000 {
            retries.clear();
        }
        let n = retries.entry(id).or_default();
        *n += 1;
        *n <= OUT_OF_GAS_RETRIES
    }

    /// How many batch rows fit under half the block gas limit.
    async fn gas_cap_rows(&self) -> Result<usize> {
        let mut limit = self.block_gas_limit.load(Ordering::Relaxed);
        if limit == 0 {
            limit = self.chain.block_gas_limit().await?;
            self.block_gas_limit.store(limit, Ordering::Relaxed);
        }
        let row_gas = self.row_gas.load(Ordering::Relaxed).max(1);
        Ok(usize::try_from(limit / 2 / row_gas).unwrap_or(usize::MAX).max(1))
    }

    /// Records intents and payment transitions in one durable write.
    async fn record(&self, intents: Vec<IntentChange>, transitions: Vec<Transition>) -> Result<()> {
        self.engine.record_settlement(intents, transitions).await
    }

    /// Forgets an intent that needs no more watching.
    async fn forget(&self, intent: &TxIntent) -> Result<()> {
        self.record(vec![IntentChange::Forget(intent.key())], Vec::new()).await
    }
}

/// The failure of a payment whose authorization its payer cancelled
/// (`AuthorizationCanceled`): nothing was paid.
pub(crate) const AUTHORIZATION_CANCELED: &str = "invalid_exact_evm_authorization_canceled";

/// Blocks one `eth_getLogs` covers when looking for how an authorization
/// was spent (providers cap the range), and how many such windows back
/// from the head are searched.
const SPENT_WINDOW: u64 = 2_000;
const SPENT_WINDOWS: u64 = 50;

/// How far a block's timestamp may lag the wall clock for a spend in it to
/// still count as after a payment's acceptance.
const ACCEPT_SKEW_SECS: u64 = 2;

impl<C: Chain> Settler<C> {
    /// What the chain says of payment `p`, whose authorization is spent but
    /// not by a transaction of x402d's: `Confirmed` with the spending
    /// transaction if that very use moved its value from its payer to its
    /// payee (the token's `Transfer` right after the `AuthorizationUsed`, in
    /// the same transaction) and happened after x402d accepted it (someone
    /// else sent the payer's authorization: the payee is paid for this
    /// payment); `Failed` with [`AUTHORIZATION_CANCELED`] if the payer
    /// cancelled it; `None` otherwise (the nonce went to another transfer,
    /// it was spent before x402d accepted it, or its log is older than the
    /// search: `…_nonce_already_used`).
    pub(crate) async fn spent_elsewhere(&self, p: &PaymentRecord) -> Result<Option<PaymentStatus>> {
        self.find_spend(p).await.or_else(|err| {
            // A node that failed to answer is asked again later: guessing
            // now would call `Failed` a payment someone else's transaction
            // settled. Anything else does not hold up the rest of a batch
            // or a receipt: only the reason is less precise.
            if err.is_retryable() {
                return Err(err);
            }
            tracing::warn!(%err, payment = %p.id, "looking up how an authorization was spent failed");
            Ok(None)
        })
    }

    async fn find_spend(&self, p: &PaymentRecord) -> Result<Option<PaymentStatus>> {
        let a = &p.authorization;
        let head = self.chain.block_number().await?;
        let mut to = head;
        for _ in 0..SPENT_WINDOWS {
            let from = to.saturating_sub(SPENT_WINDOW - 1);
            let spent = self.chain.authorization_spent(p.asset, a.from, a.nonce, from, to).await?;
            if let Some(spent) = spent {
                if spent.canceled {
                    let mut failed = self.status_with_tx(PaymentState::Failed, spent.tx, Some(spent.block));
                    failed.failure_reason = Some(AUTHORIZATION_CANCELED.into());
                    return Ok(Some(failed));
                }
                // A use before the acceptance paid for something else (an
                // authorization already settled, replayed here): not this.
                let after_acceptance = spent.timestamp.saturating_add(ACCEPT_SKEW_SECS) >= p.accepted_at_ms / 1000;
                if after_acceptance && spent.transfer == Some((a.to, a.value)) {
                    tracing::info!(payment = %p.id, tx = %spent.tx, "a payment was settled by someone else's transaction");
                    return Ok(Some(self.status_with_tx(PaymentState::Confirmed, spent.tx, Some(spent.block))));
                }
                break;
            }
            if from == 0 {
                break;
            }
            to = from - 1;
        }
        Ok(None)
    }
}

/// `transferWithAuthorization` of the payment as its payer signed it: the
/// `(v, r, s)` function for a payer without code (every EIP-3009 token has
/// it), the `bytes signature` one for a payer with code, which the token
/// asks with ERC-1271 for exactly the bytes its wallet approved.
fn transfer_call(p: &PaymentRecord) -> Bytes {
    let message = (&p.authorization).into();
    match p.signature_kind {
        SignatureKind::Ecdsa => match <&[u8; 65]>::try_from(p.signature.as_slice()) {
            Ok(signature) => transfer_with_authorization_calldata(&message, signature),
            // Accepted ECDSA signatures are 65 bytes; anything else goes as
            // it is, for the token to refuse.
            Err(_) => transfer_with_authorization_bytes_calldata(&message, p.signature.clone().into()),
        },
        SignatureKind::Erc1271 => transfer_with_authorization_bytes_calldata(&message, p.signature.clone().into()),
        SignatureKind::Erc6492 => {
            let inner = match Erc6492::unwrap(&p.signature) {
                Some(Ok(wrapped)) => wrapped.signature,
                _ => p.signature.clone().into(),
            };
            transfer_with_authorization_bytes_calldata(&message, inner)
        }
    }
}

/// The `aggregate3` rows settling `p`: for a counterfactual (ERC-6492)
/// wallet the factory call that deploys it, then the transfer, so that one
/// transaction does both; else the transfer alone. A factory row of a
/// wallet deployed meanwhile is harmless: it deploys nothing, or fails
/// alone.
fn settlement_rows(p: &PaymentRecord) -> Vec<(Address, Bytes)> {
    let deploy = match (p.signature_kind, Erc6492::unwrap(&p.signature)) {
        (SignatureKind::Erc6492, Some(Ok(wrapped))) => Some(wrapped.deploy_row()),
        _ => None,
    };
    deploy.into_iter().chain([(p.asset, transfer_call(p))]).collect()
}

impl<C: Chain> Settler<C> {
    /// The call that settles `p` alone: the token's transfer, or for a
    /// counterfactual wallet an `aggregate3` deploying it first. The
    /// transfer's row may not fail there: the transaction reverts with it,
    /// so its gas is estimated for a transfer that succeeds (with a failing
    /// row allowed, the estimate could settle on gas at which the wallet's
    /// check runs out and nothing moves).
    fn settlement_call(&self, p: &PaymentRecord) -> (Address, Bytes) {
        match p.signature_kind {
            SignatureKind::Erc6492 => {
                let rows = settlement_rows(p);
                let last = rows.len() - 1;
                let rows = rows.into_iter().enumerate().map(|(i, (to, data))| (to, data, i != last));
                (self.config.multicall, x402_chain::batch::aggregate3_calldata_with(rows))
            }
            _ => (p.asset, transfer_call(p)),
        }
    }

    /// Simulates settling `p` alone against the latest state: `Some` with
    /// the token's revert message when its transfer would fail.
    async fn simulate_payment(&self, p: &PaymentRecord) -> Result<Option<String>> {
        if p.signature_kind != SignatureKind::Erc6492 {
            return Ok(self.chain.simulate(p.asset, transfer_call(p)).await?);
        }
        // Every row allowed to fail: the transfer's row tells why it fails.
        let calldata = x402_chain::batch::aggregate3_calldata(settlement_rows(p));
        let output = match self.chain.call(self.config.multicall, calldata).await {
            Ok(output) => output,
            Err(e) if e.is_execution_failure() => return Ok(Some(e.to_string())),
            Err(e) => return Err(e.into()),
        };
        let results = x402_chain::batch::decode_aggregate3(&output)?;
        Ok(match results.last() {
            Some(row) if row.success => None,
            Some(row) => Some(row.revert_message().unwrap_or_else(|| "the transfer reverted".into())),
            None => Some("aggregate3 answered no rows".into()),
        })
    }
}

/// The x402 reason for a token revert message (the FiatToken v2 strings the
/// test token shares with USDC).
pub(crate) fn classify_revert(message: &str) -> &'static str {
    let m = message.to_lowercase();
    if m.contains("exceeds balance") {
        Reason::InsufficientBalance.code()
    } else if m.contains("used or canceled") || m.contains("used or cancelled") {
        Reason::NonceAlreadyUsed.code()
    } else if m.contains("expired") {
        Reason::ValidBefore.code()
    } else if m.contains("not yet valid") {
        Reason::ValidAfter.code()
    } else if m.contains("invalid signature") {
        Reason::Signature.code()
    } else {
        SIMULATION_FAILED
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x402_devnet::Payer;

    /// A settlement task that panics gives its payment back: the next
    /// round takes it up again (before, it stayed "in flight" until a
    /// restart, never settled).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_settlement_task_that_panics_gives_its_payment_back() {
        use crate::{
            balance::{BalanceSource, ConfiguredBalances},
            engine::MerchantUpdate,
            ledger::{Ledger, MemoryLedger},
            pipeline::PipelineConfig,
            testing::FakeChain,
        };
        let ledger: Arc<dyn Ledger> = Arc::new(MemoryLedger::new());
        let balances: Arc<dyn BalanceSource> = Arc::new(ConfiguredBalances::new(None));
        let engine = tokio::task::block_in_place(|| Engine::start(ledger, &balances, &PipelineConfig::default(), None));
        let engine = Arc::new(engine.unwrap());
        let pay_to = Address::repeat_byte(0x70);
        let update = MerchantUpdate {
            id: "m".into(),
            pay_to: vec![pay_to],
            assets: Vec::new(),
            policy: SettlementPolicy::Direct,
            api_key: None,
        };
        let merchant = engine.upsert_merchant(update).await.unwrap();
        let requirements = crate::domain::Requirements {
            scheme: "exact".into(),
            ..crate::testing::channel_requirements(Address::repeat_byte(0x5f), pay_to)
        };
        let now = crate::domain::unix_millis() / 1000;
        let payload = Payer::random().sign_exact(&requirements, now - 60, now + 600, B256::repeat_byte(1));
        let submission = crate::domain::Submission::new(requirements, crate::domain::PaymentInput::Exact(payload));
        let outcome = engine.submit(merchant, submission).await.unwrap();
        assert!(matches!(outcome, crate::pipeline::SubmitOutcome::Accepted { .. }), "{outcome:?}");

        let chain = Arc::new(FakeChain::new(31337));
        chain.panic_simulations(1);
        let config = SettlerConfig { poll: Duration::from_millis(10), ..SettlerConfig::default() };
        let settler = Settler::spawn(engine, chain.clone(), config, None);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while chain.simulations() < 3 {
            assert!(std::time::Instant::now() < deadline, "the payment was never taken up again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        settler.abort();
    }

    /// The pause doubles per round in which attempts failed for a
    /// retryable reason and none succeeded, however many failed in it, up
    /// to the cap; a payment's own error counts for nothing; a round with a
    /// success ends it.
    #[test]
    fn the_pause_doubles_per_failing_round_and_ends_at_a_success() {
        let backoff = Backoff::default();
        let poll = Duration::from_millis(100);
        let down: Result<()> = Err(crate::Error::Timeout("no answer from the chain".into()));
        assert_eq!(backoff.end_round(poll), poll, "nothing happened");
        for _ in 0..50 {
            backoff.record(&down);
        }
        assert_eq!(backoff.end_round(poll), poll * 2, "one round, however many attempts failed in it");
        backoff.record(&down);
        assert_eq!(backoff.end_round(poll), poll * 4);
        backoff.record(&Err::<(), _>(crate::Error::UnknownPayment(PaymentId(B256::ZERO))));
        assert_eq!(backoff.end_round(poll), poll * 4, "a payment's own error is no reason to slow down");
        backoff.record(&down);
        backoff.record(&Ok(()));
        assert_eq!(backoff.end_round(poll), poll, "a success in the round ends it");
        for _ in 0..40 {
            backoff.record(&down);
            backoff.end_round(poll);
        }
        assert_eq!(backoff.end_round(poll), MAX_BACKOFF);
        assert_eq!(backoff.end_round(Duration::from_secs(5)), Duration::from_secs(5), "never shorter than the poll");
    }

    #[test]
    fn reverts_map_to_x402_reasons() {
        assert_eq!(
            classify_revert("execution reverted: ERC20: transfer amount exceeds balance"),
            "invalid_exact_evm_insufficient_balance"
        );
        assert_eq!(
            classify_revert("execution reverted: FiatTokenV2: authorization is used or canceled"),
            "invalid_exact_evm_nonce_already_used"
        );
        assert_eq!(
            classify_revert("execution reverted: FiatTokenV2: authorization is expired"),
            "invalid_exact_evm_payload_authorization_valid_before"
        );
        assert_eq!(classify_revert("out of gas"), "invalid_exact_evm_transaction_simulation_failed");
    }
}
