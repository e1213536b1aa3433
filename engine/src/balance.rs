//! Where payer balances come from.
//!
//! The stateful stage asks a [`BalanceSource`] for a payer's token balance
//! and refuses a payment that the balance, minus what the payer already owes
//! in pending payments, does not cover. It is called on the hot path, so an
//! implementation answers from memory (the chain layer keeps a cache fresh).

use std::collections::HashMap;

use alloy::primitives::{Address, U256};

/// A payer's spendable token balance.
pub trait BalanceSource: Send + Sync + std::fmt::Debug + 'static {
    /// The balance of `owner` in `token` on `chain_id`; `None` when it is not
    /// limited (the check is skipped).
    fn balance(&self, chain_id: u64, token: Address, owner: Address) -> Option<U256>;
}

/// Balances given in configuration: a default for everyone and exceptions.
#[derive(Clone, Debug, Default)]
pub struct ConfiguredBalances {
    default: Option<U256>,
    accounts: HashMap<(u64, Address, Address), U256>,
}

impl ConfiguredBalances {
    /// Every payer has `default` (`None`: unlimited).
    pub fn new(default: Option<U256>) -> Self {
        Self { default, accounts: HashMap::new() }
    }

    /// Sets `owner`'s balance of `token` on `chain_id`.
    pub fn with_account(mut self, chain_id: u64, token: Address, owner: Address, balance: U256) -> Self {
        self.accounts.insert((chain_id, token, owner), balance);
        self
    }
}

impl BalanceSource for ConfiguredBalances {
    fn balance(&self, chain_id: u64, token: Address, owner: Address) -> Option<U256> {
        self.accounts.get(&(chain_id, token, owner)).copied().or(self.default)
    }
}
