//! Test doubles shared by unit tests: an in-memory [`Chain`] and a
//! [`BalanceSource`] whose fetches a test completes by hand.

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
pub(crate) fn direct_merchant(pay_to: Address) -> Merchant {
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
pub(crate) fn channel_requirements(token: Address, pay_to: Address) -> crate::domain::Requirements {
    crate::domain::Requirements {
        scheme: "batch-settlement".into(),
        network: "eip155:31337".into(),
        amount: alloy::primitives::U256::from(10),
        asset: token,
        pay_to,
        max_timeout_seconds: 60,
        eip712_name: "USD Coin".into(),
        eip712_version: "2".into(),
    }
}

/// A chain in memory: token balances, a head that moves one block per
/// transfer, and the transfers' logs. Settlement methods fail.
#[derive(Debug)]
pub(crate) struct FakeChain {
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
    pub(crate) fn new(chain_id: u64) -> Self {
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
    pub(crate) fn panic_simulations(&self, n: usize) {
        self.panicking_simulations.store(n, Ordering::SeqCst);
    }

    /// `simulate` calls so far.
    pub(crate) fn simulations(&self) -> usize {
        self.simulations.load(Ordering::SeqCst)
    }

    fn state(&self) -> MutexGuard<'_, FakeState> {
        self.state.lock().unwrap()
    }

    /// Moves `value` of `token` in a new block, with its log; from the zero
    /// address it is a mint.
    pub(crate) fn transfer(&self, token: Address, from: Address, to: Address, value: U256) {
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
    pub(crate) fn set_silently(&self, token: Address, owner: Address, value: U256) {
        self.state().balances.insert((token, owner), value);
    }

    /// Gives `account` code, as a contract wallet or an EIP-7702 delegation.
    pub(crate) fn set_code(&self, account: Address) {
        self.state().code.insert(account);
    }

    /// Mines `blocks` empty blocks.
    pub(crate) fn mine(&self, blocks: u64) {
        self.state().head += blocks;
    }

    /// `token_balance` calls so far.
    pub(crate) fn balance_reads(&self) -> usize {
        self.balance_reads.load(Ordering::SeqCst)
    }

    /// `block_number` calls so far.
    pub(crate) fn head_reads(&self) -> usize {
        self.head_reads.load(Ordering::SeqCst)
    }

    pub(crate) fn fail_balances(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    /// While paused, balance reads take their value and then wait.
    pub(crate) fn pause_balances(&self, paused: bool) {
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
pub(crate) struct ManualBalances {
    known: Mutex<HashMap<BalanceKey, Account>>,
    waiting: Mutex<Vec<(BalanceKey, Notifier)>>,
}

impl ManualBalances {
    /// The keys lookups are waiting for, one per lookup, oldest first.
    pub(crate) fn waiting(&self) -> Vec<BalanceKey> {
        self.waiting.lock().unwrap().iter().map(|(key, _)| *key).collect()
    }

    /// Finishes the fetch of `key`: a balance is known from now on.
    pub(crate) fn complete(&self, key: BalanceKey, fetched: &Fetched) {
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
