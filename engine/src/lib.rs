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
//! Modules: [`domain`] (types), [`verify`] (stage 1), [`pipeline`] (the
//! threads), [`ledger`] (storage trait, RocksDB and memory), [`engine`]
//! (the parts together), [`grpc`] and [`http`] (adapters), [`config`] and
//! [`node`] (running it). No feature flags.

pub mod balance;
pub mod channels;
pub mod config;
pub mod domain;
pub mod ecdsa;
pub mod engine;
mod error;
pub mod facilitator;
pub mod grpc;
pub mod http;
pub mod ledger;
pub mod load;
pub mod merchants;
pub mod metrics;
pub mod node;
pub mod payer;
pub mod pipeline;
mod reason;
pub mod settle;
#[cfg(test)]
mod testing;
pub mod verify;

pub use engine::{Engine, MerchantUpdate};
pub use error::{Error, Result};
pub use pipeline::SubmitOutcome;
pub use reason::{InvalidField, Reason, Rejection};
