//! A model of the pipeline, checked against the real one (its threads,
//! queues and committer over a memory ledger whose writes fail on command)
//! on random sequences of operations: submits, replays, nonce reuse,
//! balance changes, settlement transitions and reorgs, vouchers, claim and
//! refund requests, failing commits, bursts that land in one failed group,
//! writes that reach the disk though reported failed, and restarts.
//!
//! The model is small on purpose: what each payment's state is, what each
//! payer has reserved, what each channel has been charged and asked for.
//! Sequential operations have one right answer, and the model predicts it.
//! A burst's answers depend on how its items fall into groups, so there the
//! model checks what must hold whatever the grouping (an accepted voucher's
//! predecessors were accepted; nothing accepted beyond a balance) and takes
//! the state from the answers. After every operation it compares the
//! ledger with itself, and the shards too, by dry runs: each payer can pay
//! exactly its balance less its reservations, and each channel takes
//! exactly the next voucher.
//!
//! `PROPTEST_CASES` sets the number of sequences (default 32).

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use alloy::{primitives::B256, signers::local::PrivateKeySigner};
use proptest::prelude::*;
use x402_channel::{ChannelConfig, ChannelDomain, OnChain};

use super::*;
use crate::{
    balance::{Lookup, Notifier},
    channels::{ChannelNotifier, DepositNotifier, VerifiedVoucher},
    domain::{PaymentState, PendingKey},
};

const PAYERS: usize = 3;
const AMOUNTS: [u64; 3] = [100, 250, 400];
/// The channels' balances on chain: the second takes four vouchers.
const CHANNEL_BALANCES: [u128; 3] = [1_000, 40, 1_000];
/// What one voucher request charges (`channel_requirements`).
const STEP: u128 = 10;
/// What a deposit adds.
const DEPOSIT: u128 = 50;
/// The model's clock (unix seconds); payments are valid an hour around it.
const NOW: u64 = 1_800_000_000;

/// One step of a sequence.
#[derive(Clone, Debug)]
enum Op {
    /// A new payment of `AMOUNTS[amount]`.
    Pay { payer: usize, amount: usize },
    /// An earlier submit again, byte for byte.
    Replay { pick: usize },
    /// An earlier submit's nonce in another payment.
    ReuseNonce { pick: usize, amount: usize },
    /// The payer's balance on chain changes (a transfer in or out).
    SetBalance { payer: usize, balance: u64 },
    /// An open payment moves on.
    Settle { pick: usize, to: Settled },
    /// A closed payment is open again (its settlement was reorged out).
    Reorg { pick: usize },
    /// A voucher of channel `channel`.
    Voucher { channel: usize, kind: VoucherKind },
    /// An operator asks for a claim and/or a refund of the channel.
    Request { channel: usize, claim: bool, refund: bool },
    /// Every commit fails from now on (or no longer does).
    Failing(bool),
    /// The next commit reaches the disk but is reported failed (an fsync
    /// error after the log write): it must stand as if it had succeeded.
    LoseNext,
    /// Deposits from now on land, revert or find no node.
    SetDeposits(Deposits),
    /// Items sent together while the committer is held in its write of the
    /// first; then the next `fail` commits fail.
    Burst { items: Vec<Item>, fail: usize },
    /// The node stops and starts again from its ledger.
    Restart,
}

#[derive(Clone, Copy, Debug)]
enum Settled {
    Submitted,
    Confirmed,
    Failed,
}

#[derive(Clone, Copy, Debug)]
enum VoucherKind {
    /// The charged total plus one request: what an honest client sends.
    Next,
    /// The last accepted voucher again (or, before any, one skipping ahead).
    Stale,
    /// Two requests' worth above the charged total.
    Skip,
    /// The next voucher, carrying a deposit of [`DEPOSIT`].
    Deposit,
}

/// What the chain does with deposits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Deposits {
    /// They land.
    Land,
    /// The contract refuses them.
    Revert,
    /// The node cannot be reached.
    Unreachable,
}

#[derive(Clone, Copy, Debug)]
enum Item {
    Pay { payer: usize, amount: usize },
    NextVoucher { channel: usize },
}

fn item() -> impl Strategy<Value = Item> {
    prop_oneof![
        (0..PAYERS, 0..AMOUNTS.len()).prop_map(|(payer, amount)| Item::Pay { payer, amount }),
        (0..CHANNEL_BALANCES.len()).prop_map(|channel| Item::NextVoucher { channel }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let settled = prop_oneof![Just(Settled::Submitted), Just(Settled::Confirmed), Just(Settled::Failed)];
    let kind = prop_oneof![
        4 => Just(VoucherKind::Next),
        1 => Just(VoucherKind::Stale),
        1 => Just(VoucherKind::Skip),
        2 => Just(VoucherKind::Deposit),
    ];
    let deposits =
        prop_oneof![2 => Just(Deposits::Land), 1 => Just(Deposits::Revert), 1 => Just(Deposits::Unreachable)];
    prop_oneof![
        6 => (0..PAYERS, 0..AMOUNTS.len()).prop_map(|(payer, amount)| Op::Pay { payer, amount }),
        2 => any::<usize>().prop_map(|pick| Op::Replay { pick }),
        1 => (any::<usize>(), 0..AMOUNTS.len()).prop_map(|(pick, amount)| Op::ReuseNonce { pick, amount }),
        1 => (0..PAYERS, prop_oneof![Just(0u64), Just(300), Just(1_000)])
            .prop_map(|(payer, balance)| Op::SetBalance { payer, balance }),
        3 => (any::<usize>(), settled).prop_map(|(pick, to)| Op::Settle { pick, to }),
        1 => any::<usize>().prop_map(|pick| Op::Reorg { pick }),
        6 => (0..CHANNEL_BALANCES.len(), kind).prop_map(|(channel, kind)| Op::Voucher { channel, kind }),
        2 => (0..CHANNEL_BALANCES.len(), any::<bool>(), any::<bool>())
            .prop_map(|(channel, claim, refund)| Op::Request { channel, claim, refund }),
        3 => any::<bool>().prop_map(Op::Failing),
        2 => Just(Op::LoseNext),
        1 => deposits.prop_map(Op::SetDeposits),
        3 => (proptest::collection::vec(item(), 1..6), 0..3usize).prop_map(|(items, fail)| Op::Burst { items, fail }),
        1 => Just(Op::Restart),
    ]
}

/// Balances the test sets, read live; a refresh after a settlement reads
/// them again at once.
#[derive(Debug, Default)]
struct LiveBalances {
    funds: std::sync::Mutex<HashMap<Address, U256>>,
}

impl LiveBalances {
    fn set(&self, owner: Address, value: u64) {
        self.funds.lock().unwrap().insert(owner, U256::from(value));
    }

    fn get(&self, owner: Address) -> U256 {
        self.funds.lock().unwrap().get(&owner).copied().unwrap_or_default()
    }
}

impl BalanceSource for LiveBalances {
    fn lookup(&self, key: BalanceKey, _: &Notifier) -> Lookup {
        Lookup::Known(Account::Funds(self.get(key.owner)))
    }

    fn refresh(&self, key: BalanceKey, notifier: &Notifier) -> bool {
        notifier.notify(key, Ok(Account::Funds(self.get(key.owner))));
        true
    }
}

/// Channels as the chain has them: funded, never claimed; deposits land
/// at once, or fail as told.
#[derive(Debug)]
struct ModelChannels {
    balances: std::sync::Mutex<HashMap<B256, u128>>,
    deposits: std::sync::Mutex<Deposits>,
}

impl ModelChannels {
    fn onchain(balance: u128) -> OnChain {
        OnChain { balance, total_claimed: 0, withdrawal: None, refund_nonce: 0 }
    }
}

impl ChannelSource for ModelChannels {
    fn fetch(&self, v: &VerifiedVoucher, notify: ChannelNotifier) {
        let balance = self.balances.lock().unwrap().get(&v.channel_id).copied().unwrap_or_default();
        notify(v.channel_id, Ok(Self::onchain(balance)));
    }

    fn deposit(&self, v: &VerifiedVoucher, notify: DepositNotifier) {
        let amount = v.deposit.as_ref().expect("a deposit").amount;
        let result = match *self.deposits.lock().unwrap() {
            Deposits::Land => {
                let mut balances = self.balances.lock().unwrap();
                let balance = balances.entry(v.channel_id).or_default();
                *balance += amount;
                Ok(Self::onchain(*balance))
            }
            Deposits::Revert => Err(crate::channels::DepositFailure::Rejected("execution reverted".into())),
            Deposits::Unreachable => {
                Err(crate::channels::DepositFailure::Unavailable(Arc::new(Error::Io(std::io::Error::other("no node")))))
            }
        };
        notify(v.channel_id, result);
    }
}

/// A submit the sequence made.
struct Sent {
    submission: Submission,
    payer: usize,
    value: u64,
    id: PaymentId,
}

/// A payment the ledger has.
#[derive(Clone, Copy, Debug)]
struct Recorded {
    /// Which submit was recorded (a nonce reuse has the same id).
    sent: usize,
    state: PaymentState,
}

#[derive(Clone, Debug, Default)]
struct ModelChannel {
    charged: u128,
    claim_requested: bool,
    refund_requested: Option<u128>,
    /// The ledger has a record of it.
    recorded: bool,
    /// The running shards know it (read from the chain, or from the ledger at start).
    known: bool,
    /// Its balance as the shards have it: read from the chain (or told by
    /// a deposit), or from the ledger at start.
    balance: u128,
    /// Its balance as the ledger has it.
    recorded_balance: u128,
}

impl ModelChannel {
    /// A write of it is durable.
    fn recorded(&mut self) {
        self.recorded = true;
        self.recorded_balance = self.balance;
    }

    /// The shards see it: read now if they did not know it.
    fn seen(&mut self, chain_balance: u128) {
        if !self.known {
            self.known = true;
            self.balance = chain_balance;
        }
    }
}

/// What the pipeline must be: the model, and the real thing beside it.
struct World {
    ledger: Arc<FlakyLedger>,
    balances: Arc<LiveBalances>,
    chain_channels: Arc<ModelChannels>,
    config: PipelineConfig,
    pipeline: Option<Pipeline>,
    payers: Vec<Payer>,
    channel_domain: ChannelDomain,
    channels: Vec<ChannelConfig>,
    authorizer: Address,
    // The model.
    funds: [u64; PAYERS],
    sent: Vec<Sent>,
    recorded: HashMap<PaymentId, Recorded>,
    model_channels: Vec<ModelChannel>,
    /// Each channel's balance on chain.
    channel_balances: Vec<u128>,
    deposits: Deposits,
    events: u64,
    failing: bool,
    nonces: u64,
}

fn requirements(value: u64) -> Requirements {
    x402_devnet::dev_requirements(PAY_TO, TOKEN, value)
}

impl World {
    fn new() -> Self {
        let payers: Vec<Payer> = (1..=PAYERS as u8)
            .map(|i| Payer::new(PrivateKeySigner::from_bytes(&B256::repeat_byte(i)).unwrap()))
            .collect();
        let authorizer = Address::repeat_byte(0xaa);
        let contracts = crate::channels::ChannelContracts::default();
        let channel_domain = ChannelDomain::new(31337, contracts.channels);
        let channels: Vec<ChannelConfig> = (0..CHANNEL_BALANCES.len())
            .map(|i| payers[i % PAYERS].channel_config(PAY_TO, authorizer, TOKEN, 900, B256::repeat_byte(i as u8)))
            .collect();
        let source = Arc::new(ModelChannels {
            balances: std::sync::Mutex::new(
                channels.iter().zip(CHANNEL_BALANCES).map(|(c, b)| (channel_domain.channel_id(c), b)).collect(),
            ),
            deposits: std::sync::Mutex::new(Deposits::Land),
        });
        let balances = Arc::new(LiveBalances::default());
        let funds = [1_000; PAYERS];
        for (payer, funds) in payers.iter().zip(funds) {
            balances.set(payer.address(), funds);
        }
        let config = PipelineConfig {
            clock: crate::domain::Clock::set_at(NOW * 1000),
            verifiers: 2,
            shards: 3,
            channel_contracts: contracts,
            channels: source.clone(),
            ..PipelineConfig::default()
        };
        let mut world = Self {
            ledger: Arc::new(FlakyLedger::default()),
            balances,
            chain_channels: source,
            config,
            pipeline: None,
            payers,
            channel_domain,
            channels,
            authorizer,
            funds,
            sent: Vec::new(),
            recorded: HashMap::new(),
            model_channels: vec![ModelChannel::default(); CHANNEL_BALANCES.len()],
            channel_balances: CHANNEL_BALANCES.to_vec(),
            deposits: Deposits::Land,
            events: 0,
            failing: false,
            nonces: 0,
        };
        world.start();
        world
    }

    fn start(&mut self) {
        let ledger: Arc<dyn Ledger> = self.ledger.clone();
        let balances: Arc<dyn BalanceSource> = self.balances.clone();
        self.pipeline = Some(Pipeline::start(&self.config, &ledger, &balances).unwrap());
    }

    fn pipeline(&self) -> &Pipeline {
        self.pipeline.as_ref().expect("running")
    }

    // ---- building submits ----

    fn signed(&self, payer: usize, value: u64, nonce: B256, valid_before: u64) -> Submission {
        let requirements = requirements(value);
        let payload = self.payers[payer].sign_exact(&requirements, NOW - 3_600, valid_before, nonce);
        Submission::new(requirements, PaymentInput::Exact(payload))
    }

    fn new_payment(&mut self, payer: usize, value: u64) -> usize {
        self.nonces += 1;
        let nonce = B256::left_padding_from(&self.nonces.to_be_bytes());
        self.push_sent(payer, value, nonce, NOW + 3_600)
    }

    fn push_sent(&mut self, payer: usize, value: u64, nonce: B256, valid_before: u64) -> usize {
        let submission = self.signed(payer, value, nonce, valid_before);
        let id = PaymentId::new(31337, TOKEN, self.payers[payer].address(), nonce);
        self.sent.push(Sent { submission, payer, value, id });
        self.sent.len() - 1
    }

    fn channel_id(&self, channel: usize) -> B256 {
        self.channel_domain.channel_id(&self.channels[channel])
    }

    fn voucher(&self, channel: usize, max: u128) -> Submission {
        self.voucher_with(channel, max, None)
    }

    /// A voucher carrying a deposit of `deposit` (signed with salt `salt`).
    fn voucher_with(&self, channel: usize, max: u128, deposit: Option<(u128, u64)>) -> Submission {
        let payer = &self.payers[channel % PAYERS];
        let requirements = crate::testing::channel_requirements(TOKEN, PAY_TO);
        let mut payload = voucher_payload(payer, &self.channel_domain, &self.channels[channel], self.authorizer, max);
        payload.deposit = deposit.map(|(amount, salt)| {
            let collector = self.config.channel_contracts.collector;
            let id = self.channel_id(channel);
            payer.sign_deposit(&requirements, collector, id, amount, NOW + 3_600, U256::from(salt))
        });
        Submission::new(requirements, PaymentInput::Voucher(Box::new(payload)))
    }

    // ---- what the model says ----

    /// What the payer's open payments hold.
    fn reserved(&self, payer: usize) -> u64 {
        self.recorded
            .values()
            .filter(|r| r.state.is_open() && self.sent[r.sent].payer == payer)
            .map(|r| self.sent[r.sent].value)
            .sum()
    }

    /// The answer to a submit of `sent`, which the ledger does not have.
    fn fresh_outcome(&self, sent: usize) -> Expect {
        let s = &self.sent[sent];
        if self.reserved(s.payer) + s.value > self.funds[s.payer] {
            Expect::Rejected(Reason::InsufficientBalance)
        } else if self.failing {
            Expect::Unavailable
        } else {
            Expect::Accepted
        }
    }

    fn expect_submit(&self, sent: usize) -> Expect {
        let id = self.sent[sent].id;
        match self.recorded.get(&id) {
            Some(r) if self.sent[r.sent].submission == self.sent[sent].submission => Expect::Duplicate(r.state),
            Some(_) => Expect::Rejected(Reason::NonceAlreadyUsed),
            None => self.fresh_outcome(sent),
        }
    }

    // ---- running operations ----

    fn submit(&self, submission: Submission) -> oneshot::Receiver<SubmitOutcome> {
        self.pipeline().try_submit(merchant(), submission).expect("room in the queues")
    }

    fn pay(&mut self, sent: usize) -> Result<(), TestCaseError> {
        let expect = self.expect_submit(sent);
        let outcome = answer(self.submit(self.sent[sent].submission.clone()))?;
        expect.check(&outcome)?;
        if let (Expect::Accepted, SubmitOutcome::Accepted { status, .. }) = (&expect, &outcome) {
            self.recorded.insert(self.sent[sent].id, Recorded { sent, state: status.state });
            self.events += 1;
        }
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Pay { payer, amount } => {
                let sent = self.new_payment(payer, AMOUNTS[amount]);
                self.pay(sent)
            }
            Op::Replay { pick } if !self.sent.is_empty() => self.pay(pick % self.sent.len()),
            Op::ReuseNonce { pick, amount } if !self.sent.is_empty() => {
                let original = &self.sent[pick % self.sent.len()];
                let (payer, nonce) = (original.payer, original.submission.clone());
                let PaymentInput::Exact(payload) = &nonce.input else { unreachable!("exact payments only") };
                let (nonce, valid_before) =
                    (payload.authorization.nonce, payload.authorization.valid_before_secs() - 1);
                let sent = self.push_sent(payer, AMOUNTS[amount], nonce, valid_before);
                self.pay(sent)
            }
            Op::Replay { .. } | Op::ReuseNonce { .. } => Ok(()),
            Op::SetBalance { payer, balance } => {
                self.funds[payer] = balance;
                self.balances.set(self.payers[payer].address(), balance);
                Ok(())
            }
            Op::Settle { pick, to } => {
                let Some(id) = self.pick_payment(pick, true) else { return Ok(()) };
                let state = match to {
                    Settled::Submitted => PaymentState::Submitted,
                    Settled::Confirmed => PaymentState::Confirmed,
                    Settled::Failed => PaymentState::Failed,
                };
                self.transition(id, state)
            }
            Op::Reorg { pick } => {
                let Some(id) = self.pick_payment(pick, false) else { return Ok(()) };
                self.transition(id, PaymentState::Queued)
            }
            Op::Voucher { channel, kind } => self.send_voucher(channel, kind),
            Op::Request { channel, claim, refund } => self.request(channel, claim, refund),
            Op::Failing(on) => {
                self.failing = on;
                self.ledger.failing.store(on, Ordering::SeqCst);
                Ok(())
            }
            Op::LoseNext => {
                self.ledger.lose_next.store(1, Ordering::SeqCst);
                Ok(())
            }
            Op::SetDeposits(deposits) => {
                self.deposits = deposits;
                *self.chain_channels.deposits.lock().unwrap() = deposits;
                Ok(())
            }
            Op::Burst { ref items, fail } => self.burst(items, fail),
            Op::Restart => {
                self.pipeline.take().expect("running").shutdown();
                for c in &mut self.model_channels {
                    c.known = c.recorded;
                    c.balance = c.recorded_balance;
                }
                self.start();
                Ok(())
            }
        }
    }

    /// A recorded payment, open or closed as asked, picked by `pick`.
    fn pick_payment(&self, pick: usize, open: bool) -> Option<PaymentId> {
        let mut ids: Vec<_> =
            self.recorded.iter().filter(|(_, r)| r.state.is_open() == open).map(|(id, _)| *id).collect();
        ids.sort();
        (!ids.is_empty()).then(|| ids[pick % ids.len()])
    }

    /// Records payment `id`'s move to `state`, as settlement would; the
    /// chain moves the tokens first (or gives them back, for a reorg).
    fn transition(&mut self, id: PaymentId, state: PaymentState) -> Result<(), TestCaseError> {
        let recorded = self.recorded[&id];
        let (payer, value) = (self.sent[recorded.sent].payer, self.sent[recorded.sent].value);
        let chain_moves = !self.failing;
        let funds = match (recorded.state, state) {
            (PaymentState::Confirmed, s) if s.is_open() => self.funds[payer] + value,
            (s, PaymentState::Confirmed) if s.is_open() => self.funds[payer].saturating_sub(value),
            _ => self.funds[payer],
        };
        if chain_moves {
            self.funds[payer] = funds;
            self.balances.set(self.payers[payer].address(), funds);
        }
        let mut status = PaymentStatus::new(state, NOW * 1000);
        if state != PaymentState::Queued {
            status.transaction = Some(B256::repeat_byte(7));
        }
        let reply = self.pipeline().record_settlement(Vec::new(), vec![Transition { id, status }]).unwrap();
        let result = answer(reply)?;
        if self.failing {
            prop_assert!(result.is_err(), "a settlement recorded on a failing disk");
        } else {
            prop_assert!(result.is_ok(), "{result:?}");
            self.recorded.get_mut(&id).unwrap().state = state;
            self.events += 1;
        }
        Ok(())
    }

    fn send_voucher(&mut self, channel: usize, kind: VoucherKind) -> Result<(), TestCaseError> {
        let model = self.model_channels[channel].clone();
        let max = match kind {
            VoucherKind::Next | VoucherKind::Deposit => model.charged + STEP,
            VoucherKind::Stale if model.charged > 0 => model.charged,
            VoucherKind::Stale | VoucherKind::Skip => model.charged + 2 * STEP,
        };
        let deposit = matches!(kind, VoucherKind::Deposit).then(|| {
            self.nonces += 1;
            (DEPOSIT, self.nonces)
        });
        let outcome = answer(self.submit(self.voucher_with(channel, max, deposit)))?;
        self.model_channels[channel].seen(self.channel_balances[channel]);
        let model = self.model_channels[channel].clone();
        // The rules with the deposit counted, before it goes on chain.
        let balance = model.balance + deposit.map_or(0, |(amount, _)| amount);
        let rule = if max != model.charged + STEP {
            Err(Reason::CumulativeAmountMismatch)
        } else if max > balance {
            Err(Reason::CumulativeExceedsBalance)
        } else {
            Ok(())
        };
        let expect = match rule {
            Err(reason) => Err(Some(reason)),
            Ok(()) => match deposit.map(|_| self.deposits) {
                Some(Deposits::Revert) => Err(Some(Reason::DepositFailed)),
                Some(Deposits::Unreachable) => Err(None),
                Some(Deposits::Land) => {
                    self.channel_balances[channel] += DEPOSIT;
                    self.model_channels[channel].balance = self.channel_balances[channel];
                    Ok(())
                }
                None => Ok(()),
            },
        };
        match (expect, &outcome) {
            (Ok(()), SubmitOutcome::Unavailable(_)) if self.failing => {}
            (Err(None), SubmitOutcome::Unavailable(_)) => {}
            (Ok(()), SubmitOutcome::VoucherAccepted { channel: view, .. }) if !self.failing => {
                prop_assert_eq!(view.charged, max);
                let c = &mut self.model_channels[channel];
                prop_assert_eq!(view.balance, c.balance, "the channel's balance");
                c.charged = max;
                c.recorded();
            }
            (Err(Some(reason)), SubmitOutcome::VoucherRejected { rejection, channel: Some(view), .. }) => {
                prop_assert_eq!(rejection.reason, reason, "{}", rejection.message);
                prop_assert_eq!(view.charged, model.charged, "the channel in the rejection");
            }
            (expect, outcome) => {
                prop_assert!(false, "voucher {max} of channel {channel}: expected {expect:?}, answered {outcome:?}")
            }
        }
        Ok(())
    }

    fn request(&mut self, channel: usize, claim: bool, refund: bool) -> Result<(), TestCaseError> {
        let id = self.channel_id(channel);
        let model = self.model_channels[channel].clone();
        let refund = refund.then_some(model.charged);
        let result = answer(self.pipeline().request_channel(id, claim, refund).unwrap())?;
        match result {
            Ok(None) => prop_assert!(!model.known, "a channel the shard knows was not found"),
            Ok(Some(view)) => {
                // A request that changes nothing of the record (the model's
                // clock stands still) is on disk already, failing or not.
                let unchanged = model.recorded
                    && (!claim || model.claim_requested)
                    && (refund.is_none() || refund == model.refund_requested)
                    && model.balance == model.recorded_balance;
                prop_assert!(model.known && (!self.failing || unchanged), "a request was recorded: {view:?}");
                prop_assert_eq!(view.charged, model.charged);
                let c = &mut self.model_channels[channel];
                c.claim_requested |= claim;
                if refund.is_some() {
                    c.refund_requested = refund;
                }
                c.recorded();
            }
            Err(e) => prop_assert!(model.known && self.failing, "a request failed: {e}"),
        }
        Ok(())
    }

    /// Sends `items` at once: the first alone, held in its commit; the rest
    /// while it is held. Then the next `fail` commits fail.
    fn burst(&mut self, items: &[Item], fail: usize) -> Result<(), TestCaseError> {
        let mut next: HashMap<usize, u128> = HashMap::new();
        let mut sends: Vec<(Item, usize, u128)> = Vec::new();
        for item in items {
            match *item {
                Item::Pay { payer, amount } => sends.push((*item, self.new_payment(payer, AMOUNTS[amount]), 0)),
                Item::NextVoucher { channel } => {
                    let max = next.entry(channel).or_insert(self.model_channels[channel].charged);
                    *max += STEP;
                    sends.push((*item, 0, *max));
                }
            }
        }
        let stall = self.ledger.stall.lock().unwrap();
        let entered = self.ledger.entered.load(Ordering::SeqCst);
        // Answered before the commit (a refusal), or held in it.
        let mut first = None;
        let mut replies = Vec::with_capacity(sends.len());
        for (i, (item, sent, max)) in sends.iter().enumerate() {
            let submission = match *item {
                Item::Pay { .. } => self.sent[*sent].submission.clone(),
                Item::NextVoucher { channel } => self.voucher(channel, *max),
            };
            let mut rx = self.submit(submission);
            if i == 0 {
                let deadline = Instant::now() + Duration::from_secs(10);
                while self.ledger.entered.load(Ordering::SeqCst) == entered {
                    match rx.try_recv() {
                        Ok(outcome) => {
                            first = Some(outcome);
                            break;
                        }
                        Err(_) if Instant::now() > deadline => {
                            return Err(TestCaseError::fail("the first of a burst neither answered nor committed"));
                        }
                        Err(_) => thread::sleep(Duration::from_micros(200)),
                    }
                }
            }
            replies.push(rx);
        }
        thread::sleep(Duration::from_millis(20));
        self.ledger.fail_next.store(fail, Ordering::SeqCst);
        drop(stall);
        let mut outcomes = Vec::with_capacity(replies.len());
        for (i, rx) in replies.into_iter().enumerate() {
            outcomes.push(match first.take().filter(|_| i == 0) {
                Some(outcome) => outcome,
                None => answer(rx)?,
            });
        }
        self.ledger.fail_next.store(0, Ordering::SeqCst);

        // Payments: whatever was accepted fits each payer's balance; a
        // refusal for the balance counts every other payment of the burst.
        let burst_value = |payer: usize| -> u64 {
            sends
                .iter()
                .filter(|(item, _, _)| matches!(item, Item::Pay { payer: p, .. } if *p == payer))
                .map(|(_, sent, _)| self.sent[*sent].value)
                .sum()
        };
        let reserved: Vec<u64> = (0..PAYERS).map(|p| self.reserved(p)).collect();
        let mut accepted_value = [0u64; PAYERS];
        // Vouchers: which of each channel's were accepted.
        let mut accepted_vouchers: HashMap<usize, Vec<u128>> = HashMap::new();
        for ((item, sent, max), outcome) in sends.iter().zip(&outcomes) {
            match (*item, outcome) {
                (Item::Pay { payer, .. }, SubmitOutcome::Accepted { status, .. }) => {
                    prop_assert!(!self.failing, "accepted on a failing disk");
                    accepted_value[payer] += self.sent[*sent].value;
                    self.recorded.insert(self.sent[*sent].id, Recorded { sent: *sent, state: status.state });
                    self.events += 1;
                }
                (Item::Pay { payer, .. }, SubmitOutcome::Rejected { rejection, .. }) => {
                    prop_assert_eq!(rejection.reason, Reason::InsufficientBalance, "{}", rejection.message);
                    prop_assert!(
                        reserved[payer] + burst_value(payer) > self.funds[payer],
                        "refused for the balance though every payment of the burst fits: {}",
                        rejection.message
                    );
                }
                (Item::Pay { .. } | Item::NextVoucher { .. }, SubmitOutcome::Unavailable(_)) => {}
                (Item::NextVoucher { channel }, SubmitOutcome::VoucherAccepted { channel: view, .. }) => {
                    prop_assert!(!self.failing, "accepted on a failing disk");
                    prop_assert_eq!(view.charged, *max);
                    let known = &self.model_channels[channel];
                    let balance = if known.known { known.balance } else { self.channel_balances[channel] };
                    prop_assert!(*max <= balance, "a voucher beyond the channel's balance");
                    accepted_vouchers.entry(channel).or_default().push(*max);
                }
                (Item::NextVoucher { .. }, SubmitOutcome::VoucherRejected { rejection, .. }) => {
                    prop_assert!(
                        matches!(rejection.reason, Reason::CumulativeAmountMismatch | Reason::CumulativeExceedsBalance),
                        "{}",
                        rejection.message
                    );
                }
                (item, outcome) => prop_assert!(false, "{item:?} answered {outcome:?}"),
            }
        }
        for payer in 0..PAYERS {
            prop_assert!(
                accepted_value[payer] == 0 || reserved[payer] + accepted_value[payer] <= self.funds[payer],
                "payer {payer}: {} accepted on top of {} with a balance of {}",
                accepted_value[payer],
                reserved[payer],
                self.funds[payer]
            );
        }
        for (channel, mut maxes) in accepted_vouchers {
            maxes.sort_unstable();
            let c = &mut self.model_channels[channel];
            let prefix: Vec<u128> = (1..=maxes.len() as u128).map(|k| c.charged + k * STEP).collect();
            prop_assert_eq!(
                &maxes,
                &prefix,
                "channel {}: accepted vouchers whose predecessors were not (charged {})",
                channel,
                c.charged
            );
            c.seen(self.channel_balances[channel]);
            c.charged = *maxes.last().expect("one at least");
            c.recorded();
        }
        for (item, _, _) in &sends {
            if let Item::NextVoucher { channel } = item {
                self.model_channels[*channel].seen(self.channel_balances[*channel]);
            }
        }
        Ok(())
    }

    // ---- the comparison ----

    /// The ledger and the shards against the model.
    fn check(&mut self) -> Result<(), TestCaseError> {
        let ledger = &self.ledger;
        for s in &self.sent {
            let stored = ledger.payment(&s.id).unwrap();
            match self.recorded.get(&s.id) {
                Some(r) => {
                    let stored =
                        stored.ok_or_else(|| TestCaseError::fail("an accepted payment is not in the ledger"))?;
                    prop_assert_eq!(stored.status.state, r.state);
                    let PaymentInput::Exact(payload) = &self.sent[r.sent].submission.input else { unreachable!() };
                    prop_assert_eq!(stored.authorization.value, payload.authorization.value);
                }
                None => prop_assert!(stored.is_none(), "a payment never accepted is in the ledger: {stored:?}"),
            }
        }
        let pending: HashSet<PaymentId> = ledger.pending().unwrap().iter().map(|k: &PendingKey| k.id).collect();
        let open: HashSet<PaymentId> =
            self.recorded.iter().filter(|(_, r)| r.state.is_open()).map(|(id, _)| *id).collect();
        prop_assert_eq!(pending, open, "the settlement queue");
        prop_assert_eq!(ledger.last_event_sequence().unwrap(), self.events, "events recorded");
        for (i, c) in self.model_channels.iter().enumerate() {
            let stored = ledger.channel(&self.channel_id(i)).unwrap();
            match stored {
                Some(record) => {
                    prop_assert!(c.recorded, "channel {i} recorded though no write of it was acknowledged");
                    prop_assert_eq!(record.channel.charged, c.charged, "channel {} charged in the ledger", i);
                    prop_assert_eq!(record.claim_requested, c.claim_requested, "channel {} claim request", i);
                    prop_assert_eq!(record.refund_requested, c.refund_requested, "channel {} refund request", i);
                    prop_assert_eq!(record.channel.onchain.balance, c.recorded_balance, "channel {} balance", i);
                }
                None => prop_assert!(!c.recorded, "channel {i} is not in the ledger"),
            }
        }

        // The shards, by dry runs: each payer may pay exactly what its
        // balance leaves, and each known channel takes exactly the next voucher.
        self.nonces += 1;
        let nonce = B256::left_padding_from(&self.nonces.to_be_bytes());
        let pipeline = self.pipeline();
        for payer in 0..PAYERS {
            let free = self.funds[payer].saturating_sub(self.reserved(payer));
            for (value, fits) in [(free, true), (free + 1, false)] {
                if value == 0 {
                    continue;
                }
                let probe = self.signed(payer, value, nonce, NOW + 3_600);
                let outcome = answer(pipeline.try_verify(merchant(), probe).unwrap())?;
                match outcome {
                    SubmitOutcome::Verified { .. } if fits => {}
                    SubmitOutcome::Rejected { rejection, .. }
                        if !fits && rejection.reason == Reason::InsufficientBalance => {}
                    other => prop_assert!(
                        false,
                        "payer {payer} paying {value} of {} (reserved {}): {other:?}",
                        self.funds[payer],
                        self.reserved(payer)
                    ),
                }
            }
        }
        for (i, c) in self.model_channels.iter().enumerate() {
            if !c.known {
                continue;
            }
            let outcome = answer(pipeline.try_verify(merchant(), self.voucher(i, c.charged + STEP)).unwrap())?;
            let view = match outcome {
                SubmitOutcome::VoucherAccepted { channel, .. } => channel,
                SubmitOutcome::VoucherRejected { channel: Some(channel), rejection, .. }
                    if rejection.reason == Reason::CumulativeExceedsBalance =>
                {
                    channel
                }
                other => return Err(TestCaseError::fail(format!("channel {i}, next voucher: {other:?}"))),
            };
            prop_assert_eq!(view.charged, c.charged, "channel {} charged in its shard", i);
            prop_assert_eq!(view.balance, c.balance, "channel {} balance in its shard", i);
        }
        Ok(())
    }
}

/// What a sequential submit must come to.
#[derive(Debug)]
enum Expect {
    Accepted,
    Duplicate(PaymentState),
    Rejected(Reason),
    Unavailable,
}

impl Expect {
    fn check(&self, outcome: &SubmitOutcome) -> Result<(), TestCaseError> {
        let ok = match (self, outcome) {
            (Self::Accepted, SubmitOutcome::Accepted { .. }) | (Self::Unavailable, SubmitOutcome::Unavailable(_)) => {
                true
            }
            (Self::Duplicate(state), SubmitOutcome::Duplicate { status, retry, .. }) => {
                status.state == *state && !retry
            }
            (Self::Rejected(reason), SubmitOutcome::Rejected { rejection, .. }) => rejection.reason == *reason,
            _ => false,
        };
        prop_assert!(ok, "expected {self:?}, answered {outcome:?}");
        Ok(())
    }
}

/// The answer on `rx`, within 10 s: longer is a pipeline that hangs.
fn answer<T>(mut rx: oneshot::Receiver<T>) -> Result<T, TestCaseError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match rx.try_recv() {
            Ok(value) => return Ok(value),
            Err(oneshot::error::TryRecvError::Closed) => return Err(TestCaseError::fail("the reply was dropped")),
            Err(oneshot::error::TryRecvError::Empty) if Instant::now() > deadline => {
                return Err(TestCaseError::fail("no answer in 10 s: the pipeline hangs"));
            }
            Err(oneshot::error::TryRecvError::Empty) => thread::sleep(Duration::from_micros(200)),
        }
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(32)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), max_shrink_iters: 2_000, ..ProptestConfig::default() })]

    /// Every sequence keeps the pipeline, its ledger and the model in step.
    #[test]
    fn the_pipeline_follows_its_model(ops in proptest::collection::vec(op(), 1..60)) {
        let mut world = World::new();
        for (step, op) in ops.iter().enumerate() {
            world.apply(op).map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
            world.check().map_err(|e| TestCaseError::fail(format!("after step {step} {op:?}: {e}")))?;
        }
    }
}

/// Runs `ops` as the property does.
fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut world = World::new();
    for (step, op) in ops.iter().enumerate() {
        world.apply(op).map_err(|e| TestCaseError::fail(format!("step {step} {op:?}: {e}")))?;
        world.check().map_err(|e| TestCaseError::fail(format!("after step {step} {op:?}: {e}")))?;
    }
    Ok(())
}

#[test]
fn a_claim_request_whose_write_failed_is_not_recorded_later() {
    run(&[
        Op::Voucher { channel: 0, kind: VoucherKind::Next },
        Op::Failing(true),
        Op::Request { channel: 0, claim: true, refund: true },
        Op::Failing(false),
        Op::Voucher { channel: 0, kind: VoucherKind::Next },
    ])
    .unwrap();
}

#[test]
fn a_voucher_write_reported_failed_that_reached_the_disk_stands() {
    run(&[
        Op::Voucher { channel: 0, kind: VoucherKind::Next },
        Op::LoseNext,
        Op::Voucher { channel: 0, kind: VoucherKind::Next },
        Op::LoseNext,
        Op::Request { channel: 0, claim: true, refund: false },
        Op::Voucher { channel: 0, kind: VoucherKind::Next },
    ])
    .unwrap();
}
