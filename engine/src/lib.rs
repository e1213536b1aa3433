//! x402d, the x402 settlement engine: verifies x402 `exact` payments
//! locally, records every accepted one durably in RocksDB before answering,
//! and queues it for settlement by its merchant's strategy.
//!
//! ```text
//! gateway ──gRPC Submit/SubmitStream──► grpc (auth, convert)
//!                                          │
//!                                          ▼
//!                 pipeline: verify threads ─► payer shards ─► committer ──► ledger (RocksDB, fsync)
//!                           steps 1–8,        replay index,   group commit,     │
//!                           EIP-712+ecrecover reservations    then acks         ▼
//!                                                                    settlement queue + events
//!                                                                    ──► WatchSettlements, /metrics
//! ```
//!
//! The modules, in the order a payment meets them (those in plain text are
//! private; the README's "Where each part of the picture lives" maps them
//! to the picture above):
//!
//! - [`grpc`], `http`, [`facilitator`]: the adapters (gRPC services, the
//!   HTTP listener, the x402 facilitator API);
//! - [`domain`]: the types every stage shares; [`Reason`] and
//!   [`Rejection`]: why a payment is refused;
//! - [`pipeline`]: verifier threads ([`verify`], with `ecdsa`), payer
//!   shards, the committer; [`channels`]: vouchers of `batch-settlement`;
//! - [`balance`]: the payer balance and code cache the shards read;
//! - [`ledger`]: the storage trait, RocksDB and in-memory;
//! - [`settle`]: the settlers (direct, batched, intents, channel claims);
//! - [`Engine`] (`engine`), `merchants`, `metrics`: the parts together, the
//!   merchant registry, metric names;
//! - [`config`] and [`node`]: configuring and running a node.
//!
//! The tooling lives in its own crates: the load generator in `x402-load`
//! (`x402d-load`), the local chain, the dev accounts and a payer that signs
//! in `x402-devnet`, the x402 JSON types in `x402-wire`.
//!
//! One feature flag: `test-utils` makes `testing` public (test doubles of
//! the chain and the balance source, and fixtures), for benchmarks and other
//! crates' tests; the engine's own unit tests always have it.

#![warn(missing_docs)]

/// A crash point of the crash-sweep tests (feature `failpoints`): with
/// `FAILPOINTS=<name>=return` in its environment, the process aborts here,
/// as a power cut would stop it. Nothing at all without the feature.
macro_rules! crash_point {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        fail::fail_point!($name, |_| std::process::abort());
    };
}

pub mod balance;
pub mod channels;
pub mod config;
pub mod domain;
mod ecdsa;
mod engine;
mod error;
pub mod facilitator;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
mod http;
pub mod ledger;
mod merchants;
mod metrics;
pub mod node;
pub mod pipeline;
mod reason;
pub mod settle;
pub mod signature;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod verify;

pub use engine::{Engine, MerchantUpdate};
pub use error::{Error, Result};
pub use pipeline::SubmitOutcome;
pub use reason::{InvalidField, Reason, Rejection};
