//! The gas report: what settling one payment costs, directly (one
//! `transferWithAuthorization` transaction each) and batched (rows of one
//! Multicall3 `aggregate3`), measured from receipts on a fresh local anvil.
//!
//! Payments go to a payee that already holds tokens. Payers pay
//! `per_payer` times each, in a row (so with 1 every payment is its payer's
//! first, the worst case for batching: no payer's storage is warm for a
//! later row); each payer holds exactly what it pays. Direct and batched
//! settle the same mix of payments.

use std::{fmt, time::Duration};

use alloy::{
    primitives::{Address, B256, Bytes, U256},
    signers::{SignerSync, local::PrivateKeySigner},
};

use crate::{
    AlloyChain, Chain, Eip3009Domain, Error, Result, TransferWithAuthorization, TxConfig,
    anvil::Anvil,
    batch::aggregate3_calldata,
    contracts::MULTICALL3_ADDRESS,
    devnet::{self, DEV_TOKEN_NAME, DEV_TOKEN_VERSION},
    eip3009::transfer_with_authorization_calldata,
};

/// Payments settled directly to measure the direct cost.
const DIRECT_SAMPLES: usize = 20;
const PAY_TO: Address = Address::repeat_byte(0x42);
const VALUE: u64 = 10_000;

/// Gas per settled payment, directly and per batch size.
#[derive(Clone, Debug, PartialEq)]
pub struct GasReport {
    /// Payments per payer in the measured mix.
    pub per_payer: usize,
    /// Mean gas of a direct `transferWithAuthorization` transaction.
    pub direct: u64,
    /// `(rows, gas per row)` of one `aggregate3` batch each.
    pub batched: Vec<(usize, u64)>,
}

impl GasReport {
    /// Batched gas per payment at `rows` as a share of direct.
    pub fn ratio(&self, rows: usize) -> Option<f64> {
        self.batched.iter().find(|(r, _)| *r == rows).map(|(_, gas)| *gas as f64 / self.direct as f64)
    }
}

impl fmt::Display for GasReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} payment(s) per payer", self.per_payer)?;
        writeln!(f, "{:<22} {:>12} {:>10}", "settlement", "gas/payment", "vs direct")?;
        writeln!(f, "{:<22} {:>12} {:>9}%", "direct (1 tx each)", self.direct, 100)?;
        for (rows, gas) in &self.batched {
            let share = *gas as f64 * 100.0 / self.direct as f64;
            writeln!(f, "{:<22} {:>12} {:>9.1}%", format!("batched, {rows} rows"), gas, share)?;
        }
        Ok(())
    }
}

/// Starts anvil, deploys the token and Multicall3, and measures gas per
/// payment directly and at each batch size in `sizes`, with payers paying
/// `per_payer` times each. `progress` is told what is being measured.
pub async fn measure(sizes: &[usize], per_payer: usize, mut progress: impl FnMut(&str)) -> Result<GasReport> {
    let per_payer = per_payer.max(1);
    let anvil = Anvil::spawn(&["--gas-limit", "100000000"])?;
    // The warm-up payment, the direct samples, then every batch.
    let groups = std::iter::once(1).chain(std::iter::once(DIRECT_SAMPLES)).chain(sizes.iter().copied());
    let payer_count: usize = groups.map(|n| n.div_ceil(per_payer)).sum();
    let payers: Vec<PrivateKeySigner> = (0..payer_count).map(|_| PrivateKeySigner::random()).collect();
    let addresses: Vec<_> = payers.iter().map(PrivateKeySigner::address).collect();
    progress(&format!("deploying the token and minting to {} payers", payers.len()));
    let held = U256::from(VALUE * per_payer as u64);
    let net = devnet::deploy(anvil.endpoint(), &addresses, held).await?;
    let signer = PrivateKeySigner::random();
    devnet::fund_ether(anvil.endpoint(), &[signer.address()]).await?;
    let chain = AlloyChain::connect(anvil.endpoint(), vec![signer], TxConfig::default()).await?;
    let domain = Eip3009Domain::new(DEV_TOKEN_NAME, DEV_TOKEN_VERSION, chain.chain_id(), net.token);
    let call = |payer: &PrivateKeySigner, nonce: u8| -> Result<Bytes> {
        let message = TransferWithAuthorization {
            from: payer.address(),
            to: PAY_TO,
            value: U256::from(VALUE),
            validAfter: U256::ZERO,
            validBefore: U256::from(u64::MAX),
            nonce: B256::with_last_byte(nonce),
        };
        let signature = payer.sign_hash_sync(&domain.signing_hash(&message)).map_err(|e| Error::Sign(e.to_string()))?;
        Ok(transfer_with_authorization_calldata(&message, &signature.as_bytes()))
    };
    // `n` payments: each payer pays `per_payer` times in a row.
    let mut payers = payers.iter();
    let mut payments = |n: usize| -> Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let payer = payers.next().ok_or_else(|| Error::Config("ran out of payers".into()))?;
            for nonce in 0..per_payer.min(n - out.len()) {
                out.push(call(payer, u8::try_from(nonce).unwrap_or(u8::MAX))?);
            }
        }
        Ok(out)
    };

    // The payee's first credit costs more than later ones: not measured.
    for input in payments(1)? {
        send(&chain, net.token, input).await?;
    }
    progress(&format!("settling {DIRECT_SAMPLES} payments directly"));
    let mut direct = 0;
    for input in payments(DIRECT_SAMPLES)? {
        direct += send(&chain, net.token, input).await?;
    }
    let mut report = GasReport { per_payer, direct: direct / DIRECT_SAMPLES as u64, batched: Vec::new() };
    for &rows in sizes {
        progress(&format!("settling {rows} payments in one batch"));
        let calls = payments(rows)?.into_iter().map(|input| (net.token, input));
        let gas = send(&chain, MULTICALL3_ADDRESS, aggregate3_calldata(calls)).await?;
        report.batched.push((rows, gas / rows as u64));
    }
    Ok(report)
}

/// Sends one call and returns its gas used; every payment in it must settle.
async fn send(chain: &AlloyChain, to: Address, input: Bytes) -> Result<u64> {
    let gas = chain.estimate_gas(to, input.clone()).await?;
    let tx = chain.sign_call(to, input, Some(gas)).await?;
    chain.broadcast(&tx).await?;
    let receipt = chain
        .wait_receipt(&[tx.hash], Duration::from_secs(30))
        .await?
        .ok_or_else(|| Error::Config(format!("{} was not mined", tx.hash)))?;
    if !receipt.success || receipt.authorizations_used.is_empty() {
        return Err(Error::Config(format!("{} did not settle its payments", tx.hash)));
    }
    Ok(receipt.gas_used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn batching_a_hundred_rows_costs_at_most_sixty_percent_of_direct() {
        // Agents paying for API calls pay repeatedly.
        let report = measure(&[1, 10, 100], 10, |_| {}).await.unwrap();
        assert!(report.ratio(100).unwrap() <= 0.60, "{report}");
        // Bigger batches never cost more per row.
        assert!(report.ratio(10).unwrap() < report.ratio(1).unwrap(), "{report}");
        assert!(report.ratio(100).unwrap() <= report.ratio(10).unwrap(), "{report}");
    }

    #[tokio::test]
    async fn batching_pays_even_when_every_payer_pays_once() {
        let report = measure(&[100], 1, |_| {}).await.unwrap();
        assert!(report.ratio(100).unwrap() <= 0.65, "{report}");
    }
}
