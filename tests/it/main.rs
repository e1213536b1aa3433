//! Integration tests of x402d: real `x402d` processes or in-process nodes,
//! a real RocksDB, real gRPC clients over loopback.

mod api;
mod balances;
mod batched;
mod chain;
mod channels;
mod common;
mod crash;
mod crash_sweep;
mod dev;
mod disk;
mod facilitator;
mod faults;
mod interop;
mod load;
mod multichain;
mod rejections;
mod rpc;
mod rpc_proxy;
mod settle;
mod status;
mod stream;
mod tenants;
mod wallets;
