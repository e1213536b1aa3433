//! Test doubles and fixtures (feature `test-utils`; always in the engine's
//! own unit tests):
//!
//! - [`FakeChain`]: a chain in memory for balance and code reads (its
//!   settlement methods fail);
//! - [`ScriptedChain`]: a chain that signs real transactions and mines,
//!   reverts, drops, takes nonces or reorgs as the test says, for
//!   settlement's branches;
//! - [`ManualBalances`]: a [`BalanceSource`] whose fetches a test completes
//!   by hand;
//! - [`FaultyLedger`]: a ledger in front of a real one that fails, stalls
//!   or reports written commits failed, on command or at random from a seed,
//!   and [`Tmpfs`], a small filesystem to fill for real;
//! - [`direct_merchant`], [`channel_requirements`]: fixtures.

mod faulty_ledger;

pub use self::faulty_ledger::{FaultyLedger, Injected, RandomFaults, Tmpfs};

use std::{
    collections::HashMap,
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use alloy::primitives::{Address, B256, Bytes, U256};
use tokio::sync::watch;
use x402_chain::{Chain, Receipt, SignedTx, TransferLog};

use crate::{
    balance::{Account, BalanceKey, BalanceSource, Fetched, Lookup, Notifier},
    domain::{Merchant, SettlementPolicy},
};

/// Merchant "m" (number 1), paid at `pay_to` in any accepted asset, settling `direct`.
pub fn direct_merchant(pay_to: Address) -> Merchant {
    Merchant {
        id: "m".into(),
        number: 1,
        pay_to: vec![pay_to],
        assets: Vec::new(),
        policy: SettlementPolicy::Direct,
        api_key_sha256: None,
        updated_at_ms: 0,
    }
}

/// `batch-settlement` requirements of 10 of `token` on the local chain, paid
/// to `pay_to`.
pub fn channel_requirements(token: Address, pay_to: Address) -> crate::domain::Requirements {
    crate::domain::Requirements {
        scheme: "batch-settlement".into(),
        ..x402_devnet::dev_requirements(pay_to, token, 10)
    }
}

/// A chain in memory: token balances, a head that moves one block per
/// transfer, and the transfers' logs. Settlement methods fail.
#[derive(Debug)]
pub struct FakeChain {
    chain_id: u64,
    state: Mutex<FakeState>,
    balance_reads: AtomicUsize,
    head_reads: AtomicUsize,
    /// Set: `token_balance` fails.
    failing: AtomicBool,
    /// True: `token_balance` reads the balance, then waits until it is false.
    paused: watch::Sender<bool>,
    /// `simulate` calls so far; the first `panicking_simulations` panic.
    simulations: AtomicUsize,
    panicking_simulations: AtomicUsize,
}

#[derive(Debug, Default)]
struct FakeState {
    head: u64,
    balances: HashMap<(Address, Address), U256>,
    logs: Vec<(Address, TransferLog)>,
    /// Accounts that hold code (none of the others do).
    code: std::collections::HashSet<Address>,
}

impl FakeChain {
    /// A chain with id `chain_id`, no balances and no blocks yet.
    pub fn new(chain_id: u64) -> Self {
        Self {
            chain_id,
            state: Mutex::default(),
            balance_reads: AtomicUsize::new(0),
            head_reads: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            paused: watch::Sender::new(false),
            simulations: AtomicUsize::new(0),
            panicking_simulations: AtomicUsize::new(0),
        }
    }

    /// The next `n` simulations panic (a bug on a settlement task).
    pub fn panic_simulations(&self, n: usize) {
        self.panicking_simulations.store(n, Ordering::SeqCst);
    }

    /// `simulate` calls so far.
    pub fn simulations(&self) -> usize {
        self.simulations.load(Ordering::SeqCst)
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Moves `value` of `token` in a new block, with its log; from the zero
    /// address it is a mint.
    pub fn transfer(&self, token: Address, from: Address, to: Address, value: U256) {
        let mut state = self.state();
        state.head += 1;
        if from != Address::ZERO {
            let balance = state.balances.entry((token, from)).or_default();
            *balance = balance.checked_sub(value).expect("the fake's sender has the tokens");
        }
        *state.balances.entry((token, to)).or_default() += value;
        let block = state.head;
        state.logs.push((token, TransferLog { block, from, to, value }));
    }

    /// Sets a balance with no log, as if the change were missed.
    pub fn set_silently(&self, token: Address, owner: Address, value: U256) {
        self.state().balances.insert((token, owner), value);
    }

    /// Gives `account` code, as a contract wallet or an EIP-7702 delegation.
    pub fn set_code(&self, account: Address) {
        self.state().code.insert(account);
    }

    /// Mines `blocks` empty blocks.
    pub fn mine(&self, blocks: u64) {
        self.state().head += blocks;
    }

    /// `token_balance` calls so far.
    pub fn balance_reads(&self) -> usize {
        self.balance_reads.load(Ordering::SeqCst)
    }

    /// `block_number` calls so far.
    pub fn head_reads(&self) -> usize {
        self.head_reads.load(Ordering::SeqCst)
    }

    /// Makes balance reads fail (`true`) or answer again (`false`).
    pub fn fail_balances(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// While paused, balance reads take their value and then wait.
    pub fn pause_balances(&self, paused: bool) {
        self.paused.send_replace(paused);
    }
}

fn not_faked<T>() -> x402_chain::Result<T> {
    Err(x402_chain::Error::Config("not faked".into()))
}

impl Chain for FakeChain {
    fn chain_id(&self) -> u64 {
        self.chain_id
    }

    fn signers(&self) -> Vec<Address> {
        Vec::new()
    }

    async fn token_balance(&self, token: Address, owner: Address) -> x402_chain::Result<U256> {
        self.balance_reads.fetch_add(1, Ordering::SeqCst);
        if self.failing.load(Ordering::SeqCst) {
            return Err(x402_chain::Error::Decode("the fake node is down".into()));
        }
        let balance = self.state().balances.get(&(token, owner)).copied().unwrap_or_default();
        let mut paused = self.paused.subscribe();
        let _ = paused.wait_for(|p| !*p).await;
        Ok(balance)
    }

    async fn has_code(&self, account: Address) -> x402_chain::Result<bool> {
        if self.failing.load(Ordering::SeqCst) {
            return Err(x402_chain::Error::Decode("the fake node is down".into()));
        }
        Ok(self.state().code.contains(&account))
    }

    async fn authorization_state(&self, _: Address, _: Address, _: B256) -> x402_chain::Result<bool> {
        not_faked()
    }

    async fn authorization_spent(
        &self,
        _: Address,
        _: Address,
        _: B256,
        _: u64,
        _: u64,
    ) -> x402_chain::Result<Option<x402_chain::AuthorizationSpent>> {
        not_faked()
    }

    async fn block_number(&self) -> x402_chain::Result<u64> {
        self.head_reads.fetch_add(1, Ordering::SeqCst);
        Ok(self.state().head)
    }

    async fn head_time(&self) -> x402_chain::Result<u64> {
        Ok(crate::domain::unix_millis() / 1000)
    }

    async fn block_hash(&self, _: u64) -> x402_chain::Result<Option<B256>> {
        not_faked()
    }

    async fn transfer_logs(&self, token: Address, from: u64, to: u64) -> x402_chain::Result<Vec<TransferLog>> {
        Ok(self
            .state()
            .logs
            .iter()
            .filter(|(t, log)| *t == token && (from..=to).contains(&log.block))
            .map(|(_, log)| *log)
            .collect())
    }

    async fn channel_logs(&self, _: Address, _: u64, _: u64) -> x402_chain::Result<Vec<x402_chain::ChannelLog>> {
        not_faked()
    }

    async fn simulate(&self, _: Address, _: Bytes) -> x402_chain::Result<Option<String>> {
        self.simulations.fetch_add(1, Ordering::SeqCst);
        let panicking =
            self.panicking_simulations.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        assert!(panicking.is_err(), "a simulation panicked, as the test asked");
        not_faked()
    }

    async fn call(&self, _: Address, _: Bytes) -> x402_chain::Result<Bytes> {
        not_faked()
    }

    async fn estimate_gas(&self, _: Address, _: Bytes) -> x402_chain::Result<u64> {
        not_faked()
    }

    async fn block_gas_limit(&self) -> x402_chain::Result<u64> {
        not_faked()
    }

    async fn sign_call(&self, _: Address, _: Bytes, _: Option<u64>) -> x402_chain::Result<SignedTx> {
        not_faked()
    }

    async fn bump(&self, _: &SignedTx) -> x402_chain::Result<SignedTx> {
        not_faked()
    }

    async fn broadcast(&self, _: &SignedTx) -> x402_chain::Result<()> {
        not_faked()
    }

    fn confirmations(&self) -> u64 {
        1
    }

    async fn receipt(&self, _: B256) -> x402_chain::Result<Option<Receipt>> {
        not_faked()
    }

    async fn wait_receipt(&self, _: &[B256], _: Duration) -> x402_chain::Result<Option<Receipt>> {
        not_faked()
    }
}

/// A balance source that knows what a test told it; any other balance is
/// [`Lookup::Pending`] until the test calls [`ManualBalances::complete`].
#[derive(Debug, Default)]
pub struct ManualBalances {
    known: Mutex<HashMap<BalanceKey, Account>>,
    waiting: Mutex<Vec<(BalanceKey, Notifier)>>,
}

impl ManualBalances {
    /// The keys lookups are waiting for, one per lookup, oldest first.
    pub fn waiting(&self) -> Vec<BalanceKey> {
        self.waiting.lock().unwrap().iter().map(|(key, _)| *key).collect()
    }

    /// Finishes the fetch of `key`: a balance is known from now on.
    pub fn complete(&self, key: BalanceKey, fetched: &Fetched) {
        if let Ok(balance) = fetched {
            self.known.lock().unwrap().insert(key, *balance);
        }
        let notifiers: Vec<Notifier> = {
            let mut waiting = self.waiting.lock().unwrap();
            let (done, rest): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(k, _)| *k == key);
            *waiting = rest;
            done.into_iter().map(|(_, n)| n).collect()
        };
        for notifier in notifiers {
            notifier.notify(key, fetched.clone());
        }
    }
}

impl BalanceSource for ManualBalances {
    /// A known balance is read again when the test completes it.
    fn refresh(&self, key: BalanceKey, notifier: &Notifier) -> bool {
        if !self.known.lock().unwrap().contains_key(&key) {
            return false;
        }
        self.waiting.lock().unwrap().push((key, notifier.clone()));
        true
    }

    fn lookup(&self, key: BalanceKey, notifier: &Notifier) -> Lookup {
        if let Some(balance) = self.known.lock().unwrap().get(&key) {
            return Lookup::Known(*balance);
        }
        self.waiting.lock().unwrap().push((key, notifier.clone()));
        Lookup::Pending
    }
}

/// Signature proofs a test gives by hand: every request waits until the
/// test answers it.
#[derive(Debug, Default)]
pub struct ManualSignatures {
    waiting: Mutex<Vec<(crate::signature::SignatureRequest, crate::signature::ProofNotifier)>>,
}

impl ManualSignatures {
    /// The requests waiting for an answer, oldest first.
    pub fn waiting(&self) -> Vec<crate::signature::SignatureRequest> {
        self.waiting.lock().unwrap().iter().map(|(r, _)| r.clone()).collect()
    }

    /// Waits until `n` requests wait (at most 10 s).
    pub fn wait_for(&self, n: usize) -> Vec<crate::signature::SignatureRequest> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let waiting = self.waiting();
            if waiting.len() >= n {
                return waiting;
            }
            assert!(std::time::Instant::now() < deadline, "{} proofs asked, not {n}", waiting.len());
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Answers `request` with `proved`.
    pub fn answer(&self, request: &crate::signature::SignatureRequest, proved: crate::signature::Proved) {
        let done = {
            let mut waiting = self.waiting.lock().unwrap();
            let at = waiting.iter().position(|(r, _)| r == request).expect("a proof was asked for it");
            waiting.remove(at).1
        };
        done.notify(proved);
    }
}

impl crate::signature::SignatureSource for ManualSignatures {
    fn prove(&self, _: u64, request: crate::signature::SignatureRequest, done: crate::signature::ProofNotifier) {
        self.waiting.lock().unwrap().push((request, done));
    }
}

/// A chain that settles by a test's script: it signs real EIP-1559
/// transactions with one key, keeps what is broadcast, and mines, reverts,
/// drops or reorgs it when the test says (or mines each broadcast at once
/// with [`ScriptedChain::auto_mine`]). Settlement runs on it as on a node,
/// without one.
#[derive(Debug)]
pub struct ScriptedChain {
    address: Address,
    wallet: alloy::network::EthereumWallet,
    script: Mutex<Script>,
    /// The signed bytes of every transaction signed, by hash.
    signed: Mutex<HashMap<B256, Bytes>>,
}

#[derive(Debug, Default)]
struct Script {
    auto_mine: bool,
    /// Confirmations a receipt needs (0 taken as 1).
    confirmations: u64,
    next_nonce: u64,
    head: u64,
    /// Block hashes changed by a reorg (the others are derived from the number).
    reorged: HashMap<u64, B256>,
    /// Every hash broadcast, in order (a rebroadcast counts again).
    broadcasts: Vec<B256>,
    mined: HashMap<B256, Receipt>,
    /// Nonces a transaction of the signer took on chain, and by which.
    used_nonces: HashMap<u64, B256>,
    /// What `simulate` answers, once each; then it passes.
    simulations: std::collections::VecDeque<Option<String>>,
    spent: HashMap<(Address, Address, B256), x402_chain::AuthorizationSpent>,
    /// The errors the next broadcasts answer, in order.
    broadcast_errors: std::collections::VecDeque<&'static str>,
    /// Log searches (`authorization_spent`) that fail as a node that cannot be reached.
    log_errors: usize,
    /// The latest block's timestamp, when a test set it (else the system clock).
    head_time: Option<u64>,
}

impl Script {
    fn block_hash(&self, number: u64) -> B256 {
        self.reorged.get(&number).copied().unwrap_or_else(|| alloy::primitives::keccak256(number.to_be_bytes()))
    }
}

/// A transaction's `transferWithAuthorization` as (token, from, nonce).
fn transfer_of(to: Address, input: &[u8]) -> Option<x402_chain::AuthorizationUsed> {
    use alloy::sol_types::SolCall;
    let call = x402_chain::eip3009::IEip3009::transferWithAuthorizationCall::abi_decode(input).ok()?;
    Some(x402_chain::AuthorizationUsed { token: to, authorizer: call.from, nonce: call.nonce })
}

impl Default for ScriptedChain {
    fn default() -> Self {
        Self::new()
    }
}

impl ScriptedChain {
    /// The chain id it signs for.
    pub const CHAIN_ID: u64 = 31337;
    /// Gas a mined transaction uses unless it ran out.
    pub const GAS_USED: u64 = 60_000;

    /// A chain with one random signer and nothing mined.
    pub fn new() -> Self {
        let key = alloy::signers::local::PrivateKeySigner::random();
        Self { address: key.address(), wallet: key.into(), script: Mutex::default(), signed: Mutex::default() }
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }

    /// From now on every broadcast is mined at once, successfully.
    pub fn auto_mine(&self, on: bool) {
        self.script().auto_mine = on;
    }

    /// Receipts count once they have `n` confirmations.
    pub fn require_confirmations(&self, n: u64) {
        self.script().confirmations = n;
    }

    /// Every hash broadcast so far, in order.
    pub fn broadcasts(&self) -> Vec<B256> {
        self.script().broadcasts.clone()
    }

    /// Mines `hash` in a new block: successful, its authorization (if it is
    /// a `transferWithAuthorization`) used.
    pub fn mine(&self, hash: B256) {
        self.include(hash, true, false);
    }

    /// Mines `hash` in a new block, reverted; having used all its gas when
    /// `out_of_gas`.
    pub fn revert(&self, hash: B256, out_of_gas: bool) {
        self.include(hash, false, out_of_gas);
    }

    fn include(&self, hash: B256, success: bool, out_of_gas: bool) {
        let raw = self.raw_of(hash);
        let tx = SignedTx::from_raw(raw, self.address).expect("a transaction this chain signed");
        let mut script = self.script();
        script.head += 1;
        let block = script.head;
        let receipt = Receipt {
            tx: hash,
            block,
            block_hash: script.block_hash(block),
            confirmations: 1,
            success,
            gas_used: if out_of_gas { tx.gas_limit } else { Self::GAS_USED },
            effective_gas_price: 1,
            authorizations_used: if success { transfer_of(tx.to, &tx.input).into_iter().collect() } else { Vec::new() },
        };
        script.used_nonces.insert(tx.nonce, hash);
        script.mined.insert(hash, receipt);
    }

    /// The signed bytes of a hash this chain was asked to broadcast.
    fn raw_of(&self, hash: B256) -> Bytes {
        self.signed.lock().unwrap().get(&hash).cloned().expect("a transaction this chain signed")
    }

    /// Another transaction of the signer takes `nonce` on chain.
    pub fn take_nonce(&self, nonce: u64) {
        let mut script = self.script();
        script.head += 1;
        script.used_nonces.insert(nonce, B256::repeat_byte(0xee));
    }

    /// The latest block's timestamp is `secs` from now on.
    pub fn set_head_time(&self, secs: u64) {
        self.script().head_time = Some(secs);
    }

    /// Whether a transaction of the signer took `nonce` on chain.
    pub fn nonce_taken(&self, nonce: u64) -> bool {
        self.script().used_nonces.contains_key(&nonce)
    }

    /// `blocks` empty blocks on top.
    pub fn mine_blocks(&self, blocks: u64) {
        self.script().head += blocks;
    }

    /// A reorg takes `hash`'s block off the chain: the transaction is no
    /// longer included (mine it again to put it in a new block).
    pub fn reorg_out(&self, hash: B256) {
        let mut script = self.script();
        let receipt = script.mined.remove(&hash).expect("a mined transaction");
        script.reorged.insert(receipt.block, B256::repeat_byte(0xab));
        script.used_nonces.retain(|_, h| *h != hash);
    }

    /// What the next simulations answer, in order (`None`: it would pass).
    pub fn simulate_next(&self, answers: impl IntoIterator<Item = Option<String>>) {
        self.script().simulations.extend(answers);
    }

    /// `authorizer`'s `nonce` on `token` was spent, as `spent` says.
    pub fn spend(&self, token: Address, authorizer: Address, nonce: B256, spent: x402_chain::AuthorizationSpent) {
        self.script().spent.insert((token, authorizer, nonce), spent);
    }

    /// The next `n` log searches fail as a node that cannot be reached.
    pub fn fail_log_searches(&self, n: usize) {
        self.script().log_errors += n;
    }

    /// The next `n` broadcasts fail as a node that cannot be reached.
    pub fn fail_broadcasts(&self, n: usize) {
        self.script().broadcast_errors.extend(std::iter::repeat_n("connection refused", n));
    }

    /// The node refuses the next `n` broadcasts: their fees are below the
    /// base fee.
    pub fn refuse_broadcasts(&self, n: usize) {
        self.script().broadcast_errors.extend(std::iter::repeat_n("max fee per gas less than block base fee", n));
    }

    /// The node forgets what nonces it handed out (a restart on a node that
    /// never saw the pending transactions).
    pub fn forget_nonces(&self) {
        self.script().next_nonce = 0;
    }

    async fn sign(&self, to: Address, input: Bytes, nonce: u64, gas: u64, fees: (u128, u128)) -> SignedTx {
        use alloy::{
            eips::eip2718::Encodable2718,
            network::{NetworkTransactionBuilder, TransactionBuilder},
        };
        let request = alloy::rpc::types::TransactionRequest::default()
            .with_from(self.address)
            .with_to(to)
            .with_input(input)
            .with_chain_id(Self::CHAIN_ID)
            .with_nonce(nonce)
            .with_gas_limit(gas)
            .with_max_fee_per_gas(fees.0)
            .with_max_priority_fee_per_gas(fees.1);
        let envelope = request.build(&self.wallet).await.expect("signs");
        let raw: Bytes = envelope.encoded_2718().into();
        let tx = SignedTx::from_raw(raw.clone(), self.address).expect("decodes");
        self.signed.lock().unwrap().insert(tx.hash, raw);
        tx
    }
}

impl Chain for ScriptedChain {
    fn chain_id(&self) -> u64 {
        Self::CHAIN_ID
    }

    fn signers(&self) -> Vec<Address> {
        vec![self.address]
    }

    async fn token_balance(&self, _: Address, _: Address) -> x402_chain::Result<U256> {
        Ok(U256::MAX)
    }

    async fn has_code(&self, _: Address) -> x402_chain::Result<bool> {
        Ok(false)
    }

    async fn authorization_state(&self, token: Address, authorizer: Address, nonce: B256) -> x402_chain::Result<bool> {
        let script = self.script();
        Ok(script.spent.contains_key(&(token, authorizer, nonce))
            || script.mined.values().any(|r| r.used(token, authorizer, nonce)))
    }

    async fn authorization_spent(
        &self,
        token: Address,
        authorizer: Address,
        nonce: B256,
        from: u64,
        to: u64,
    ) -> x402_chain::Result<Option<x402_chain::AuthorizationSpent>> {
        let mut script = self.script();
        if script.log_errors > 0 {
            script.log_errors -= 1;
            return Err(x402_chain::Error::Rpc(alloy::transports::TransportErrorKind::custom_str(
                "connection refused",
            )));
        }
        let spent = script.spent.get(&(token, authorizer, nonce)).copied();
        Ok(spent.filter(|s| (from..=to).contains(&s.block)))
    }

    async fn block_number(&self) -> x402_chain::Result<u64> {
        Ok(self.script().head)
    }

    async fn head_time(&self) -> x402_chain::Result<u64> {
        Ok(self.script().head_time.unwrap_or_else(|| crate::domain::unix_millis() / 1000))
    }

    async fn block_hash(&self, number: u64) -> x402_chain::Result<Option<B256>> {
        let script = self.script();
        Ok((number <= script.head).then(|| script.block_hash(number)))
    }

    async fn transfer_logs(&self, _: Address, _: u64, _: u64) -> x402_chain::Result<Vec<TransferLog>> {
        Ok(Vec::new())
    }

    async fn channel_logs(&self, _: Address, _: u64, _: u64) -> x402_chain::Result<Vec<x402_chain::ChannelLog>> {
        Ok(Vec::new())
    }

    async fn simulate(&self, _: Address, _: Bytes) -> x402_chain::Result<Option<String>> {
        Ok(self.script().simulations.pop_front().flatten())
    }

    async fn call(&self, _: Address, _: Bytes) -> x402_chain::Result<Bytes> {
        not_faked()
    }

    async fn estimate_gas(&self, _: Address, _: Bytes) -> x402_chain::Result<u64> {
        Ok(100_000)
    }

    async fn block_gas_limit(&self) -> x402_chain::Result<u64> {
        Ok(30_000_000)
    }

    async fn sign_call(&self, to: Address, input: Bytes, gas_limit: Option<u64>) -> x402_chain::Result<SignedTx> {
        let nonce = {
            let mut script = self.script();
            script.next_nonce += 1;
            script.next_nonce - 1
        };
        Ok(self.sign(to, input, nonce, gas_limit.unwrap_or(100_000), (2_000_000_000, 1_000_000_000)).await)
    }

    async fn bump(&self, tx: &SignedTx) -> x402_chain::Result<SignedTx> {
        let raise = |old: u128| old + old / 8 + 1;
        let fees = (raise(tx.max_fee_per_gas), raise(tx.max_priority_fee_per_gas));
        Ok(self.sign(tx.to, tx.input.clone(), tx.nonce, tx.gas_limit, fees).await)
    }

    async fn floor_nonce(&self, _: Address, next: u64) -> x402_chain::Result<()> {
        let mut script = self.script();
        script.next_nonce = script.next_nonce.max(next);
        Ok(())
    }

    async fn fill_nonce(&self, tx: &SignedTx) -> x402_chain::Result<()> {
        self.take_nonce(tx.nonce);
        Ok(())
    }

    async fn fill_gaps(&self, _: Address, below: u64, held: &[u64]) -> x402_chain::Result<u64> {
        // The node's next nonce: past the contiguous ones taken.
        let next = (0..).find(|n| !self.nonce_taken(*n)).unwrap_or(0);
        let gaps: Vec<u64> = (next..below).filter(|n| !held.contains(n)).collect();
        gaps.iter().for_each(|n| self.take_nonce(*n));
        Ok(gaps.len() as u64)
    }

    async fn broadcast(&self, tx: &SignedTx) -> x402_chain::Result<()> {
        let auto_mine = {
            let mut script = self.script();
            if let Some(error) = script.broadcast_errors.pop_front() {
                return Err(x402_chain::Error::Rpc(alloy::transports::TransportErrorKind::custom_str(error)));
            }
            if script.mined.contains_key(&tx.hash) {
                return Ok(());
            }
            if script.used_nonces.contains_key(&tx.nonce) {
                return Err(x402_chain::Error::NonceTooLow { signer: tx.signer, nonce: tx.nonce });
            }
            script.broadcasts.push(tx.hash);
            script.auto_mine
        };
        if auto_mine {
            self.mine(tx.hash);
        }
        Ok(())
    }

    fn confirmations(&self) -> u64 {
        self.script().confirmations.max(1)
    }

    async fn receipt(&self, hash: B256) -> x402_chain::Result<Option<Receipt>> {
        let script = self.script();
        Ok(script.mined.get(&hash).map(|r| Receipt { confirmations: script.head + 1 - r.block, ..r.clone() }))
    }

    async fn wait_receipt(&self, hashes: &[B256], timeout: Duration) -> x402_chain::Result<Option<Receipt>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for hash in hashes.iter().rev() {
                if let Some(receipt) = self.receipt(*hash).await?
                    && receipt.confirmations >= self.confirmations()
                {
                    return Ok(Some(receipt));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}
