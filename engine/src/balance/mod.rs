//! Where payer balances come from.
//!
//! The stateful stage asks a [`BalanceSource`] for a payer's token balance
//! and refuses a payment that the balance, minus what the payer already owes
//! in pending payments, does not cover. It is asked on the hot path, from a
//! shard thread that must never wait on the network, so a lookup answers
//! from memory or says the balance is not known yet:
//!
//! ```text
//!  shard ── lookup(key, notifier) ──► Known / Unlimited: checked at once
//!    ▲                           └──► Pending: the shard parks the payment (and every
//!    │                                later one of the same key) and the source fetches
//!    └──── notifier(key, balance or error) ◄── fetch done: parked payments re-run in order
//! ```
//!
//! [`ConfiguredBalances`] always knows (from configuration);
//! [`ChainBalances`] caches balances read from a chain, and with each
//! whether the payer holds code: the token checks such a payer's signature
//! with ERC-1271, not `ecrecover`, so the shard has its signature proved on
//! chain (see [`crate::signature`]).

mod chain;

use std::{collections::HashMap, sync::Arc};

use alloy::primitives::{Address, U256};

pub use self::chain::{ChainBalances, ChainBalancesConfig};
use crate::Error;

pub use crate::domain::BalanceKey;

/// What a balance's key holds on chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Account {
    /// A payer without code, and its balance.
    Funds(U256),
    /// A payer that holds code (a contract wallet, or an EOA delegated by
    /// EIP-7702), and its balance: the token checks its signature with
    /// ERC-1271, so it is proved on chain.
    Contract(U256),
    /// No contract is at the token's address.
    NoToken,
}

/// What a [`BalanceSource`] knows about a balance right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    /// Not limited: the check is skipped.
    Unlimited,
    /// The account, with its spendable balance.
    Known(Account),
    /// Not in memory. The source is fetching it and will call the notifier
    /// it was given, once, with the result.
    Pending,
}

/// What a fetch came to: the account, or why it could not be read (the
/// payments waiting for it are answered UNAVAILABLE, never accepted
/// unchecked).
pub type Fetched = Result<Account, Arc<Error>>;

/// Reports a fetch's result to whoever was told [`Lookup::Pending`]. Cloning
/// is a reference count; the source keeps a clone only on a miss.
#[derive(Clone)]
pub struct Notifier(Arc<dyn Fn(BalanceKey, Fetched) + Send + Sync>);

impl Notifier {
    /// A notifier calling `notify` with each fetched balance.
    pub fn new(notify: impl Fn(BalanceKey, Fetched) + Send + Sync + 'static) -> Self {
        Self(Arc::new(notify))
    }

    /// Delivers `fetched` for `key`; never blocks (a shard's control queue
    /// is unbounded).
    pub fn notify(&self, key: BalanceKey, fetched: Fetched) {
        (self.0)(key, fetched);
    }

    /// Whether `other` is this notifier (a clone of it).
    pub fn same(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notifier")
    }
}

/// A payer's spendable token balance.
pub trait BalanceSource: Send + Sync + std::fmt::Debug + 'static {
    /// The balance at `key`. On [`Lookup::Pending`] the source must call
    /// `notifier` for `key` once the fetch it started (or joined) is done,
    /// whether it succeeded or not; it clones `notifier` only then, so a
    /// lookup that answers from memory costs no allocation.
    fn lookup(&self, key: BalanceKey, notifier: &Notifier) -> Lookup;

    /// Reads `key` again if it is cached, by a fetch that starts after this
    /// call, and calls `notifier` once that fetch is done: a settlement moved
    /// the payer's tokens, and a cached balance from before it would count
    /// them twice over once their reservation is released. `false` when
    /// nothing is cached that could be stale (then `notifier` is not called).
    fn refresh(&self, key: BalanceKey, notifier: &Notifier) -> bool {
        let _ = (key, notifier);
        false
    }
}

/// Balances given in configuration: a default for everyone and exceptions.
#[derive(Clone, Debug, Default)]
pub struct ConfiguredBalances {
    default: Option<U256>,
    accounts: HashMap<BalanceKey, U256>,
}

impl ConfiguredBalances {
    /// Every payer has `default` (`None`: unlimited).
    pub fn new(default: Option<U256>) -> Self {
        Self { default, accounts: HashMap::new() }
    }

    /// Sets `owner`'s balance of `token` on `chain_id`.
    pub fn with_account(mut self, chain_id: u64, token: Address, owner: Address, balance: U256) -> Self {
        self.accounts.insert(BalanceKey { chain_id, token, owner }, balance);
        self
    }
}

impl BalanceSource for ConfiguredBalances {
    fn lookup(&self, key: BalanceKey, _: &Notifier) -> Lookup {
        self.accounts
            .get(&key)
            .copied()
            .or(self.default)
            .map_or(Lookup::Unlimited, |b| Lookup::Known(Account::Funds(b)))
    }
}
