//! A local x402 chain and what plays on it, for `x402d dev`, the tests, the
//! benchmarks and the load generator; none of it runs in a production node.
//!
//! - [`Anvil`]: a local anvil node (the binary pinned in the workspace's
//!   `package.json`, installed with `npm ci` when missing);
//! - [`deploy`] and the `DEV_*` constants: the test token, Multicall3 and the
//!   `batch-settlement` contracts at their well-known addresses, funded
//!   payers; the dev node's accounts and credentials ([`DEV_MERCHANTS`], …);
//! - [`Payer`]: a payer key that signs `exact` payments, vouchers, deposits
//!   and cancellations as an x402 client would;
//! - [`gas`]: the gas report (what settling a payment costs per strategy).
//!
//! No feature flags.

#![warn(missing_docs)]

mod accounts;
mod anvil;
mod deploy;
mod error;
pub mod gas;
mod payer;

pub use accounts::{
    DEV_ADMIN_KEY, DEV_MERCHANTS, DEV_MINT, DEV_PAY_TO, DEV_PAYER_KEYS, dev_authorizer, dev_payers, dev_requirements,
    unix_now,
};
pub use anvil::Anvil;
pub use deploy::{
    DEV_DEPLOYER_KEY, DEV_TOKEN_ADDRESS, DEV_TOKEN_NAME, DEV_TOKEN_VERSION, Devnet, code_at, deploy, fund_ether,
    set_interval_mining,
};
pub use error::{Error, Result};
pub use payer::Payer;
