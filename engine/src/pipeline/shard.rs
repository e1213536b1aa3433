//! Stage 2: the stateful checks, one owner thread per payer shard.
//!
//! A shard owns, for its payers, the in-memory replay window (payment id →
//! digest and status) and the reservations (value of accepted payments not
//! yet settled, per chain, token and payer). Because only this thread
//! touches them, checks and updates need no lock, and two submits of one
//! payment can never both pass.
//!
//! The shard never waits on the network: when the balance source does not
//! have a payer's balance in memory, the payment is parked, with every later
//! payment of the same (chain, token, payer), until the source sends the
//! fetched balance through the shard's own queue
//! ([`ShardMsg::Balance`]); then they are checked in arrival order. A failed
//! fetch answers them UNAVAILABLE.
//!
//! A payer that holds code (the balance source says so) has its signature
//! proved on chain ([`crate::signature`]): its payment is parked the same
//! way, at the head of its payer's queue, until the proof comes back
//! ([`ShardMsg::Proved`]). The later payments of that payer parked behind
//! it are sent to be proved at once, so one payer's burst costs one batch,
//! not one round trip per payment; they are still checked in order.
//!
//! A shard also owns the `batch-settlement` channels whose ids hash to it;
//! that half of [`Shard`] (vouchers, channel reads, deposits) is in
//! `shard/vouchers.rs`.

mod vouchers;

use std::{
    collections::{HashMap, VecDeque},
    mem,
    sync::Arc,
    time::Duration,
};

use alloy::primitives::{Address, B256, U256};
use crossbeam::channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use self::vouchers::ParkedVoucher;
use super::{
    SubmitOutcome,
    messages::{ChannelReply, CommitItem, ReservationChange, ShardMsg},
};
use crate::{
    balance::{Account, BalanceSource, Fetched, Lookup, Notifier},
    channels::{ChannelNotifier, ChannelSource, ChannelView, ClaimOutcome, DepositNotifier, NoChannels},
    domain::{
        BalanceKey, ChannelRecord, Clock, IdempotencyKey, Merchant, PaymentId, PaymentRecord, PaymentState,
        PaymentStatus, PendingKey, SignatureKind,
    },
    reason::{Reason, Rejection},
    signature::{Check, NoSignatures, Proof, ProofNotifier, Proved, SignatureRequest, SignatureSource},
    verify::{SignatureCheck, Verified},
};
use x402_chain::{eip3009::transfer_with_authorization_bytes_calldata, signature::Erc6492};

struct ReplayEntry {
    digest: B256,
    payer: Address,
    valid_before: u64,
    status: PaymentStatus,
    /// Who recorded it, and with which idempotency key: a submit from the
    /// same merchant with the same key is a retry, anything else a replay.
    merchant_number: u32,
    idempotency: Option<IdempotencyKey>,
}

/// A payment waiting for its payer's balance, or for its signature's proof.
struct Parked {
    merchant: Arc<Merchant>,
    verified: Verified,
    reply: oneshot::Sender<SubmitOutcome>,
    proof: ProofState,
}

/// Where a parked payment's on-chain signature proof stands.
enum ProofState {
    /// None asked (none needed, or not known yet).
    None,
    /// Asked, under this ticket, for this request.
    Asked(u64, SignatureRequest),
    /// Answered, for this request: it counts only if the payment's request
    /// is still this one when its turn comes (its payer's code may have
    /// been read again meanwhile).
    Ready(Proved, SignatureRequest),
}

impl Parked {
    fn new(merchant: Arc<Merchant>, verified: Verified, reply: oneshot::Sender<SubmitOutcome>) -> Self {
        Self { merchant, verified, reply, proof: ProofState::None }
    }
}

/// What the token will be given to check a payment's signature, and how.
struct Signed {
    kind: SignatureKind,
    /// The signature to record, when not the one submitted.
    signature: Option<Vec<u8>>,
}

/// How `verified`'s signature must be checked, for a payer that holds code
/// or not: locally done (`Ok(Err(signed))`), to prove on chain
/// (`Ok(Ok(request))`), or refused (`Err(why)`).
fn signature_plan(verified: &Verified, has_code: bool) -> Result<Result<SignatureRequest, Signed>, String> {
    // The transfer its settlement will send: the `bytes signature` function
    // with `signature`, after the factory call of `deploy`.
    let request = |signature: &[u8], deploy: Option<&Erc6492>| SignatureRequest {
        signer: verified.payer(),
        check: Check::Transfer {
            token: verified.requirements.asset,
            calldata: transfer_with_authorization_bytes_calldata(
                &(&verified.payload.authorization).into(),
                signature.to_vec().into(),
            ),
        },
        deploy: deploy.cloned(),
    };
    match (&verified.signature, has_code) {
        (SignatureCheck::Recovered, false) => Ok(Err(Signed { kind: SignatureKind::Ecdsa, signature: None })),
        (SignatureCheck::NotRecovered(why), false) => Err(why.clone()),
        (SignatureCheck::Counterfactual(wrapped), false) => Ok(Ok(request(&wrapped.signature, Some(wrapped)))),
        // A deployed wallet checks its own signature, whatever the wrapper
        // would have deployed.
        (SignatureCheck::Counterfactual(wrapped), true) => Ok(Ok(request(&wrapped.signature, None))),
        (SignatureCheck::Recovered | SignatureCheck::NotRecovered(_), true) => {
            Ok(Ok(request(&verified.payload.signature, None)))
        }
    }
}

impl Signed {
    /// What a payment whose `request` was proved is recorded and settled
    /// as: the signature the proved transfer carried.
    fn proved(request: &SignatureRequest, verified: &Verified) -> Self {
        match (&request.deploy, &verified.signature) {
            (Some(_), _) => Self { kind: SignatureKind::Erc6492, signature: None },
            (None, SignatureCheck::Counterfactual(wrapped)) => {
                Self { kind: SignatureKind::Erc1271, signature: Some(wrapped.signature.to_vec()) }
            }
            (None, _) => Self { kind: SignatureKind::Erc1271, signature: None },
        }
    }
}

/// What [`Shard::check`] came to.
#[allow(
    clippy::large_enum_variant,
    reason = "returned once per payment and moved straight on; boxing would allocate on the hot path"
)]
enum Checked {
    /// The committer takes it from here.
    Commit(CommitItem),
    /// Answered here.
    Answered,
    /// The balance is being fetched: park it.
    Wait(Verified, oneshot::Sender<SubmitOutcome>),
    /// Its signature must be proved on chain: park it and ask; the payer
    /// holds code (`true`) or the signature is a counterfactual one.
    Prove(Verified, oneshot::Sender<SubmitOutcome>, SignatureRequest, bool),
}

pub(crate) struct Shard {
    index: usize,
    replay: HashMap<PaymentId, ReplayEntry>,
    reserved: HashMap<BalanceKey, U256>,
    balances: Arc<dyn BalanceSource>,
    /// Sends fetched balances to this shard's own queue.
    notifier: Notifier,
    /// Payments waiting for a balance or a proof, in arrival order per key.
    parked: HashMap<BalanceKey, VecDeque<Parked>>,
    parked_len: usize,
    commit: Sender<CommitItem>,
    retention_secs: u64,
    /// The channels this shard owns, by id.
    channels: HashMap<B256, ChannelRecord>,
    channel_source: Arc<dyn ChannelSource>,
    channel_notifier: ChannelNotifier,
    deposit_notifier: DepositNotifier,
    /// Vouchers waiting for a channel read, in arrival order per channel.
    parked_vouchers: HashMap<B256, Vec<ParkedVoucher>>,
    /// Vouchers in `parked_vouchers`, over all channels.
    parked_vouchers_len: usize,
    /// Most payments, and most vouchers, parked at once; beyond, submits
    /// are answered UNAVAILABLE.
    max_parked: usize,
    /// Channels whose claim reverts (quarantined by the claims): their new
    /// vouchers are refused, they could not be claimed either, until a
    /// claim of them is mined.
    unclaimable: std::collections::HashSet<B256>,
    /// Reservations of payments settled on chain, held until the balance
    /// source has read their payer's balance after the settlement: until
    /// then a cached balance may still hold the settled tokens, and
    /// releasing would let them count zero times.
    settled_unseen: HashMap<BalanceKey, U256>,
    /// Where the time is read.
    clock: Clock,
    /// Proves the signatures of payers with code.
    signatures: Arc<dyn SignatureSource>,
    /// This shard's own control queue, where proofs are delivered.
    control: Sender<ShardMsg>,
    /// The ticket of the next proof asked.
    next_ticket: u64,
    /// Vouchers whose signatures are being proved on chain, by ticket.
    proving_vouchers: HashMap<u64, ParkedVoucher>,
    /// Of those, how many per channel.
    proving_per_channel: HashMap<B256, usize>,
}

impl Shard {
    /// Sweep the replay window this often when idle or busy.
    const SWEEP_EVERY: Duration = Duration::from_secs(30);
    /// Most requests of one channel waiting behind its read or deposit (a
    /// client sends one at a time; more is a flood).
    const MAX_PARKED_PER_CHANNEL: usize = 64;
    /// Most payments of one payer, from one merchant, waiting for their
    /// proofs (a payer with code, or one named as such by a flood); beyond,
    /// UNAVAILABLE.
    const MAX_PARKED_PER_PAYER: usize = 256;
    /// A channel mirror younger than this is trusted when a voucher exceeds
    /// its balance; an older one is read again first.
    const CHANNEL_REFRESH: Duration = Duration::from_secs(2);

    /// A shard whose fetched balances, channels and deposits arrive on
    /// `control`, its unbounded queue: the fetch tasks run on the async
    /// runtime and must never block on a busy shard.
    pub(crate) fn new(
        index: usize,
        balances: Arc<dyn BalanceSource>,
        control: Sender<ShardMsg>,
        commit: Sender<CommitItem>,
        retention_secs: u64,
    ) -> Self {
        let (channel_control, deposit_control, balance_control) = (control.clone(), control.clone(), control.clone());
        let notifier = Notifier::new(move |key, fetched| {
            let _ = balance_control.send(ShardMsg::Balance { key, fetched });
        });
        let channel_notifier: ChannelNotifier = Arc::new(move |id, fetched| {
            let _ = channel_control.send(ShardMsg::ChannelFetched { id, fetched });
        });
        let deposit_notifier: DepositNotifier = Arc::new(move |id, result| {
            let _ = deposit_control.send(ShardMsg::Deposited { id, result });
        });
        Self {
            index,
            replay: HashMap::new(),
            reserved: HashMap::new(),
            balances,
            notifier,
            parked: HashMap::new(),
            parked_len: 0,
            commit,
            retention_secs,
            channels: HashMap::new(),
            channel_source: Arc::new(NoChannels),
            channel_notifier,
            deposit_notifier,
            parked_vouchers: HashMap::new(),
            parked_vouchers_len: 0,
            max_parked: 65_536,
            unclaimable: std::collections::HashSet::new(),
            settled_unseen: HashMap::new(),
            clock: Clock::system(),
            signatures: Arc::new(NoSignatures),
            control,
            next_ticket: 0,
            proving_vouchers: HashMap::new(),
            proving_per_channel: HashMap::new(),
        }
    }

    /// Proves the signatures of payers with code through `signatures`.
    pub(crate) fn with_signatures(mut self, signatures: Arc<dyn SignatureSource>) -> Self {
        self.signatures = signatures;
        self
    }

    /// Reads the time from `clock`.
    pub(crate) fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Parks at most `max` payments, and at most `max` vouchers.
    pub(crate) const fn with_max_parked(mut self, max: usize) -> Self {
        self.max_parked = max;
        self
    }

    /// Reads unknown channels from `source`.
    pub(crate) fn with_channels(mut self, source: Arc<dyn ChannelSource>) -> Self {
        self.channel_source = source;
        self
    }

    /// Adds a channel read from the ledger at start.
    pub(crate) fn restore_channel(&mut self, record: ChannelRecord) {
        self.channels.insert(record.channel.id, record);
    }

    pub(crate) fn replay_len(&self) -> usize {
        self.replay.len()
    }

    /// Adds a payment read from the ledger at start.
    pub(crate) fn restore(&mut self, record: &PaymentRecord, now: u64) {
        let valid_before = record.authorization.valid_before_secs();
        if record.status.state.is_open() {
            *self.reserved.entry(record.balance_key()).or_default() += record.authorization.value;
        }
        if valid_before.saturating_add(self.retention_secs) >= now {
            self.replay.insert(
                record.id,
                ReplayEntry {
                    digest: record.digest,
                    payer: record.authorization.from,
                    valid_before,
                    status: record.status.clone(),
                    merchant_number: record.merchant_number,
                    idempotency: record.idempotency,
                },
            );
        }
    }

    /// Handles `control` (everything but new payments: answers of the
    /// committer, fetches, requests; unbounded, so that no sender ever
    /// waits on this shard) before `rx` (new payments and vouchers from the
    /// verifiers; bounded, the pipeline's backpressure) until told to stop.
    pub(crate) fn run(mut self, rx: &Receiver<ShardMsg>, control: &Receiver<ShardMsg>) {
        let stage = format!("shard-{}", self.index);
        let mut last_sweep = std::time::Instant::now();
        let mut handled = 0u32;
        loop {
            let received = crossbeam::channel::select_biased! {
                recv(control) -> msg => msg.map_err(|_| RecvTimeoutError::Disconnected),
                recv(rx) -> msg => msg.map_err(|_| RecvTimeoutError::Disconnected),
                default(Self::SWEEP_EVERY) => Err(RecvTimeoutError::Timeout),
            };
            match received {
                Ok(msg) => {
                    if !self.handle(msg) {
                        return;
                    }
                    handled = handled.wrapping_add(1);
                    if handled.is_multiple_of(1024) {
                        metrics::gauge!(crate::metrics::QUEUE_DEPTH, "stage" => stage.clone()).set(rx.len() as f64);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if last_sweep.elapsed() >= Self::SWEEP_EVERY {
                self.sweep(self.clock.now_secs());
                last_sweep = std::time::Instant::now();
            }
        }
    }

    /// Handles one message; false when the shard should stop.
    fn handle(&mut self, msg: ShardMsg) -> bool {
        match msg {
            ShardMsg::Payment { merchant, verified, reply } => self.submit(merchant, verified, reply),
            ShardMsg::Revert { id, reservation, value } => {
                self.replay.remove(&id);
                self.release(reservation, value);
                true
            }
            ShardMsg::Settled { id, status, reservation } => {
                if let Some(entry) = self.replay.get_mut(&id) {
                    entry.status = status;
                }
                match reservation {
                    Some(ReservationChange::Release(key, value)) => {
                        if self.balances.refresh(key, &self.notifier) {
                            *self.settled_unseen.entry(key).or_default() += value;
                        } else {
                            self.release(key, value);
                        }
                    }
                    Some(ReservationChange::Reserve(key, value)) => *self.reserved.entry(key).or_default() += value,
                    None => {}
                }
                true
            }
            ShardMsg::Balance { key, fetched } => {
                // A read after the settlement: its tokens are out of the
                // balance, so out of the reservations too. (After a failed
                // read they stay reserved; the sweep asks again.)
                if fetched.is_ok()
                    && let Some(value) = self.settled_unseen.remove(&key)
                {
                    self.release(key, value);
                }
                self.resume(key, Some(&fetched))
            }
            ShardMsg::Proved { key, ticket, proved } => {
                let Some(queue) = self.parked.get_mut(&key) else { return true };
                let Some(parked) = queue.iter_mut().find(|p| matches!(p.proof, ProofState::Asked(t, _) if t == ticket))
                else {
                    return true;
                };
                let ProofState::Asked(_, request) = mem::replace(&mut parked.proof, ProofState::None) else {
                    unreachable!("found asked")
                };
                parked.proof = ProofState::Ready(proved, request);
                self.resume(key, None)
            }
            ShardMsg::Voucher { merchant, verified, reply } => self.voucher(merchant, verified, reply),
            ShardMsg::VoucherProved { ticket, proved } => self.voucher_proved(ticket, proved),
            ShardMsg::ChannelFetched { id, fetched } => self.channel_fetched(id, fetched),
            ShardMsg::Deposited { id, result } => self.deposited(id, result),
            ShardMsg::ChannelSync { id, onchain, claimed, reply } => {
                let Some(record) = self.channels.get_mut(&id) else {
                    let _ = reply.send(Ok(()));
                    return true;
                };
                let now_ms = self.clock.now_ms();
                record.channel.sync(onchain, now_ms / 1000);
                let mut event = None;
                if let Some(ClaimOutcome::Quarantined { merchant_number, reason }) = claimed {
                    self.unclaimable.insert(id);
                    let mut status = PaymentStatus::new(PaymentState::Failed, now_ms);
                    status.failure_reason = Some(reason);
                    event = Some((merchant_number, status));
                } else if let Some(ClaimOutcome::Claimed(c)) = claimed {
                    record.last_claim_at = c.at;
                    record.claim_requested &= !c.served_claim;
                    if c.served_refund.is_some() && record.refund_requested == c.served_refund {
                        record.refund_requested = None;
                    }
                    // An event only for a claim mined and successful.
                    if c.tx != B256::ZERO {
                        self.unclaimable.remove(&id);
                        let mut status = PaymentStatus::new(PaymentState::Confirmed, now_ms);
                        status.transaction = Some(c.tx);
                        status.block = Some(c.block);
                        event = Some((c.merchant_number, status));
                    }
                }
                record.updated_at_ms = now_ms;
                let reply = ChannelReply::Synced(reply);
                let item = CommitItem::ChannelWrite { record: Box::new(record.clone()), event, previous: None, reply };
                self.commit.send(item).is_ok()
            }
            ShardMsg::ChannelRequest { id, claim, refund, reply } => {
                let Some(record) = self.channels.get_mut(&id) else {
                    let _ = reply.send(Ok(None));
                    return true;
                };
                let previous = Some((Box::new(record.clone()), self.index));
                record.claim_requested |= claim;
                if refund.is_some() {
                    record.refund_requested = refund;
                }
                record.updated_at_ms = self.clock.now_ms();
                let reply = ChannelReply::Requested(reply, ChannelView::from(&record.channel));
                let item = CommitItem::ChannelWrite { record: Box::new(record.clone()), event: None, previous, reply };
                self.commit.send(item).is_ok()
            }
            ShardMsg::ChannelRevert { record } => {
                let id = record.channel.id;
                self.channels.insert(id, *record);
                // Behind whatever this shard sent before, which the
                // committer refuses until it reads this.
                self.commit.send(CommitItem::ChannelReverted { id }).is_ok()
            }
            ShardMsg::Stop => {
                for Parked { reply, .. } in mem::take(&mut self.parked).into_values().flatten() {
                    let _ = reply.send(SubmitOutcome::Unavailable("shutting down".into()));
                }
                self.parked_vouchers_len = 0;
                for ParkedVoucher { reply, .. } in mem::take(&mut self.parked_vouchers).into_values().flatten() {
                    let _ = reply.send(SubmitOutcome::Unavailable("shutting down".into()));
                }
                for ParkedVoucher { reply, .. } in mem::take(&mut self.proving_vouchers).into_values() {
                    let _ = reply.send(SubmitOutcome::Unavailable("shutting down".into()));
                }
                false
            }
        }
    }

    /// A new payment: checked now, or parked behind earlier payments of its
    /// key that wait for a balance or a proof. False when the committer is
    /// gone.
    fn submit(&mut self, merchant: Arc<Merchant>, verified: Verified, reply: oneshot::Sender<SubmitOutcome>) -> bool {
        let key =
            BalanceKey { chain_id: verified.chain_id, token: verified.requirements.asset, owner: verified.payer() };
        // Empty unless a fetch is in flight: no hashing on the usual path.
        if !self.parked.is_empty() && self.parked.contains_key(&key) {
            self.park(key, Parked::new(merchant, verified, reply));
            return true;
        }
        match self.check(&merchant, verified, reply, None, None) {
            Checked::Commit(item) => self.commit.send(item).is_ok(),
            Checked::Answered => true,
            Checked::Wait(verified, reply) => {
                tracing::debug!(shard = self.index, payer = %key.owner, "payment parked until its balance is fetched");
                self.park(key, Parked::new(merchant, verified, reply));
                true
            }
            Checked::Prove(verified, reply, request, _) => {
                if self.parked_len >= self.max_parked {
                    let _ = reply.send(SubmitOutcome::Unavailable("too many payments wait for payer balances".into()));
                    return true;
                }
                let ticket = self.ask(key, request.clone());
                self.park(key, Parked { merchant, verified, reply, proof: ProofState::Asked(ticket, request) });
                true
            }
        }
    }

    /// Asks for `request`'s proof, delivered to this shard's control queue.
    fn ask(&mut self, key: BalanceKey, request: SignatureRequest) -> u64 {
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let control = self.control.clone();
        let done = ProofNotifier::new(move |proved| {
            let _ = control.send(ShardMsg::Proved { key, ticket, proved });
        });
        self.signatures.prove(key.chain_id, request, done);
        ticket
    }

    /// Queues a payment behind `key`'s fetch, unless too many wait already.
    fn park(&mut self, key: BalanceKey, parked: Parked) {
        // Behind a proof: a payer with code (payments behind a balance read
        // are bounded by `max_parked` alone).
        // Counted per merchant: one merchant's flood of payments "from" a
        // wallet cannot keep its payments to other merchants out.
        let proving = |q: &VecDeque<Parked>| q.front().is_some_and(|p| !matches!(p.proof, ProofState::None));
        let merchant = parked.merchant.number;
        let full = |q: &VecDeque<Parked>| {
            q.len() >= Self::MAX_PARKED_PER_PAYER
                && q.iter().filter(|p| p.merchant.number == merchant).count() >= Self::MAX_PARKED_PER_PAYER
        };
        if self.parked.get(&key).is_some_and(|q| proving(q) && full(q)) {
            let _ = parked.reply.send(SubmitOutcome::Unavailable("too many payments of this payer wait; retry".into()));
            return;
        }
        if self.parked_len >= self.max_parked {
            // A fetch in flight for it finds nothing parked, which is fine.
            let _ = parked.reply.send(SubmitOutcome::Unavailable("too many payments wait for payer balances".into()));
            return;
        }
        self.parked_len += 1;
        self.parked.entry(key).or_default().push_back(parked);
    }

    /// `key`'s balance was fetched (`fetched`), or a proof of one of its
    /// parked payments came back: its parked payments are checked, in the
    /// order they arrived, up to the first that waits again. False when the
    /// committer is gone.
    fn resume(&mut self, key: BalanceKey, fetched: Option<&Fetched>) -> bool {
        let Some(mut queue) = self.parked.remove(&key) else { return true };
        let before = queue.len();
        let mut alive = true;
        // `check` refuses those whose validity the wait ate.
        while let Some(Parked { merchant, verified, reply, proof }) = queue.pop_front() {
            let proof = match proof {
                ProofState::Asked(ticket, request) => {
                    queue.push_front(Parked { merchant, verified, reply, proof: ProofState::Asked(ticket, request) });
                    break;
                }
                ProofState::Ready(proved, request) => Some((proved, request)),
                ProofState::None => None,
            };
            match self.check(&merchant, verified, reply, fetched, proof) {
                Checked::Commit(item) => {
                    if self.commit.send(item).is_err() {
                        alive = false;
                        break;
                    }
                }
                Checked::Answered => {}
                Checked::Wait(verified, reply) => {
                    queue.push_front(Parked::new(merchant, verified, reply));
                    break;
                }
                Checked::Prove(verified, reply, request, has_code) => {
                    let ticket = self.ask(key, request.clone());
                    queue.push_front(Parked { merchant, verified, reply, proof: ProofState::Asked(ticket, request) });
                    // The payer's later payments need theirs too: asked now,
                    // they are proved together.
                    for parked in queue.iter_mut().skip(1) {
                        if matches!(parked.proof, ProofState::None)
                            && let Ok(Ok(request)) = signature_plan(&parked.verified, has_code)
                        {
                            parked.proof = ProofState::Asked(self.ask(key, request.clone()), request);
                        }
                    }
                    break;
                }
            }
        }
        self.parked_len -= before - queue.len();
        if alive && !queue.is_empty() {
            self.parked.insert(key, queue);
        }
        alive
    }

    /// Step 9 from local state, with `fetched` as the balance if given, else
    /// the source's, and for a payer with code step 4 with `proof` (asked
    /// for when `None`).
    fn check(
        &mut self,
        merchant: &Merchant,
        verified: Verified,
        reply: oneshot::Sender<SubmitOutcome>,
        fetched: Option<&Fetched>,
        proof: Option<(Proved, SignatureRequest)>,
    ) -> Checked {
        let payer = verified.payer();
        let id = verified.id;
        // A signature that recovers to the payer is the payer's: its replays
        // are told apart at once. Any other is the payer's only once the
        // chain says so, and until then says nothing of the payer's nonces.
        let recovered = matches!(verified.signature, SignatureCheck::Recovered);
        if recovered && self.replay.contains_key(&id) {
            return self.replayed(merchant, &verified, reply);
        }

        // Stage 1 checked the time when it verified; a wait for this shard or
        // for the payer's balance (a stall, a clock stepping back) may have
        // eaten the validity, and past `validBefore` the replay window may
        // have let go of an earlier submit of this very payment.
        let valid_before = verified.payload.authorization.valid_before_secs();
        let now_ms = self.clock.now_ms();
        let now = now_ms / 1000;
        if valid_before <= now {
            let message =
                format!("validBefore {valid_before} passed while the payment waited to be checked (now {now})");
            return self.reject(reply, id, payer, Reason::ValidBefore, message);
        }

        let value = verified.payload.authorization.value;
        let key = BalanceKey { chain_id: verified.chain_id, token: verified.requirements.asset, owner: payer };
        let balance = match fetched {
            Some(Ok(balance)) => Lookup::Known(*balance),
            Some(Err(e)) => {
                let _ = reply.send(SubmitOutcome::Unavailable(e.for_clients()));
                return Checked::Answered;
            }
            None => self.balances.lookup(key, &self.notifier),
        };
        let (balance, has_code) = match balance {
            Lookup::Unlimited => (None, false),
            Lookup::Known(Account::NoToken) => {
                let message = format!("no contract at the asset {} on chain {}", key.token, key.chain_id);
                return self.reject(reply, id, payer, Reason::InvalidNetwork, message);
            }
            Lookup::Known(Account::Funds(balance)) => (Some(balance), false),
            Lookup::Known(Account::Contract(balance)) => (Some(balance), true),
            Lookup::Pending => return Checked::Wait(verified, reply),
        };
        let signed = match signature_plan(&verified, has_code) {
            Err(why) => {
                // Not the payer's signature: the refusal names no payer.
                crate::metrics::rejected(Reason::Signature);
                let rejection = Rejection::new(Reason::Signature, why);
                let _ = reply.send(SubmitOutcome::Rejected { id: Some(id), payer: None, rejection });
                return Checked::Answered;
            }
            Ok(Err(signed)) => signed,
            Ok(Ok(_)) if balance.is_none() => {
                let message = format!(
                    "{payer}'s signature needs an on-chain check, and this node reads no balances or code from a \
                     chain to make it"
                );
                return self.reject(reply, id, payer, Reason::Signature, message);
            }
            Ok(Ok(request)) => match proof.filter(|(_, asked)| *asked == request).map(|(proved, _)| proved) {
                None => {
                    // Not asked before the balance allows it: a flood of
                    // payments "from" a funded contract costs no proof.
                    if let Some(balance) = balance {
                        let reserved = self.reserved.get(&key).copied().unwrap_or_default();
                        if reserved.saturating_add(value) > balance {
                            let message =
                                format!("{payer}'s balance does not cover {value} on top of its pending payments");
                            return self.reject(reply, id, payer, Reason::InsufficientBalance, message);
                        }
                    }
                    return Checked::Prove(verified, reply, request, has_code);
                }
                Some(Ok(Proof::Valid)) => Signed::proved(&request, &verified),
                Some(Ok(Proof::Refused(reason, why))) => return self.reject(reply, id, payer, reason, why),
                Some(Err(e)) => {
                    let _ = reply.send(SubmitOutcome::Unavailable(e.for_clients()));
                    return Checked::Answered;
                }
            },
        };
        if !recovered && self.replay.contains_key(&id) {
            return self.replayed(merchant, &verified, reply);
        }
        if let Some(balance) = balance {
            let reserved = self.reserved.get(&key).copied().unwrap_or_default();
            if reserved.saturating_add(value) > balance {
                return self.reject(
                    reply,
                    id,
                    payer,
                    Reason::InsufficientBalance,
                    format!("balance {balance} does not cover {value} on top of {reserved} pending"),
                );
            }
        }
        if verified.dry_run {
            let _ = reply.send(SubmitOutcome::Verified { id, payer });
            return Checked::Answered;
        }

        let status = PaymentStatus::new(PaymentState::Queued, now_ms);
        self.replay.insert(
            id,
            ReplayEntry {
                digest: verified.digest,
                payer,
                valid_before,
                status: status.clone(),
                merchant_number: merchant.number,
                idempotency: verified.idempotency,
            },
        );
        *self.reserved.entry(key).or_default() += value;

        let Verified { requirements, payload, digest, chain_id, idempotency, .. } = verified;
        let record = PaymentRecord {
            id,
            merchant_id: merchant.id.clone(),
            merchant_number: merchant.number,
            chain_id,
            asset: requirements.asset,
            eip712_name: requirements.eip712_name,
            eip712_version: requirements.eip712_version,
            authorization: payload.authorization,
            signature: signed.signature.unwrap_or(payload.signature),
            signature_kind: signed.kind,
            digest,
            policy: merchant.policy.clone(),
            status,
            accepted_at_ms: now_ms,
            idempotency,
        };
        let pending = PendingKey { merchant_number: merchant.number, deadline: valid_before, id };
        Checked::Commit(CommitItem::Payment { record: Box::new(record), pending, shard: self.index, reply })
    }

    /// The answer to `verified`, whose id is in the replay window: the same
    /// payment (its digest), or another with the same nonce.
    fn replayed(&self, merchant: &Merchant, verified: &Verified, reply: oneshot::Sender<SubmitOutcome>) -> Checked {
        let (id, payer) = (verified.id, verified.payer());
        let entry = &self.replay[&id];
        if entry.digest == verified.digest {
            metrics::counter!(crate::metrics::PAYMENTS_DUPLICATE).increment(1);
            let retry = verified.idempotency.is_some()
                && verified.idempotency == entry.idempotency
                && entry.merchant_number == merchant.number;
            // Answered by the committer, after the original's group is durable.
            let outcome = SubmitOutcome::Duplicate { id, payer: entry.payer, status: entry.status.clone(), retry };
            return Checked::Commit(CommitItem::Reply { outcome, reply });
        }
        let nonce = verified.payload.authorization.nonce;
        let message = format!("nonce {nonce} of {payer} was already used by another payment");
        self.reject(reply, id, payer, Reason::NonceAlreadyUsed, message)
    }

    fn reject(
        &self,
        reply: oneshot::Sender<SubmitOutcome>,
        id: PaymentId,
        payer: Address,
        reason: Reason,
        message: String,
    ) -> Checked {
        crate::metrics::rejected(reason);
        let _ = reply.send(SubmitOutcome::Rejected {
            id: Some(id),
            payer: Some(payer),
            rejection: Rejection::new(reason, message),
        });
        Checked::Answered
    }

    fn release(&mut self, key: BalanceKey, value: U256) {
        if let Some(reserved) = self.reserved.get_mut(&key) {
            *reserved = reserved.saturating_sub(value);
            if reserved.is_zero() {
                self.reserved.remove(&key);
            }
        }
    }

    /// Drops replay entries past `validBefore` + retention: no new submit of
    /// them can pass stage 1 any more, and the ledger keeps them.
    fn sweep(&mut self, now: u64) {
        let unseen: Vec<BalanceKey> = self.settled_unseen.keys().copied().collect();
        for key in unseen {
            if !self.balances.refresh(key, &self.notifier)
                && let Some(value) = self.settled_unseen.remove(&key)
            {
                self.release(key, value);
            }
        }
        let retention = self.retention_secs;
        self.replay.retain(|_, e| e.valid_before.saturating_add(retention) >= now);
    }
}
