//! Settlement gas per payment for each strategy, from receipts on a fresh
//! local anvil (the gas report of `x402d gas-report`):
//!
//! - `direct`: one `transferWithAuthorization` transaction per payment;
//! - `batched`: rows of one Multicall3 `aggregate3` transaction, at 1, 10,
//!   100 and 500 rows;
//! - `channel`: one `claimWithSignature` + `settle` transaction claiming
//!   1, 10, 100 and 500 channels, per payment at 1, 100 and 1,000 vouchers
//!   per channel per claim.
//!
//! Gas is deterministic, so this measures once instead of sampling time:
//! `cargo bench --bench settlement_gas` prints the table for payers paying
//! once and ten times each (the first is batching's worst case).

fn main() {
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    for per_payer in [1, 10] {
        let report = runtime
            .block_on(x402_devnet::gas::measure(&[1, 10, 100, 500], per_payer, |step| eprintln!("{step}")))
            .expect("the gas report needs anvil (npm ci)");
        println!("{report}");
    }
}
