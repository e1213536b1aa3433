//! The gas report: what settling one payment costs, directly (one
//! `transferWithAuthorization` transaction each), batched (rows of one
//! Multicall3 `aggregate3`), and through `batch-settlement` channels (one
//! `claimWithSignature` + `settle` transaction claiming many channels, each
//! row covering every voucher paid through its channel since the last
//! claim), measured from receipts on a fresh local anvil.
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

use alloy::sol_types::SolCall;
use x402_channel::{ChannelConfig, ChannelDomain, Voucher};

use x402_chain::{
    AlloyChain, Chain, Eip3009Domain, ReceiveWithAuthorization, TransferWithAuthorization, TxConfig,
    batch::aggregate3_calldata,
    channel::{
        ClaimRow, claim_and_settle_calldata, claim_batch, deposit_calldata, deposit_collector_data, deposit_nonce,
    },
    contracts::{MULTICALL3_ADDRESS, X402BatchSettlement as C},
    eip3009::transfer_with_authorization_calldata,
};

use crate::{
    Anvil, DEV_TOKEN_NAME, DEV_TOKEN_VERSION, Error, Result,
    deploy::{self as devnet},
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
    /// `(channels, gas per channel)` of one claim-and-settle transaction
    /// each. A row pays for every voucher of its channel since the last
    /// claim: per payment it is this divided by the vouchers per claim.
    pub channel: Vec<(usize, u64)>,
}

/// Vouchers per channel per claim shown in the report.
const VOUCHERS_PER_CLAIM: [u64; 3] = [1, 100, 1_000];

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
        for (channels, gas) in &self.channel {
            for vouchers in VOUCHERS_PER_CLAIM {
                let per_payment = *gas as f64 / vouchers as f64;
                let share = per_payment * 100.0 / self.direct as f64;
                let name = format!("channel, {channels}×{vouchers}");
                writeln!(f, "{name:<22} {per_payment:>12.1} {share:>9.2}%")?;
            }
        }
        writeln!(f, "(channel, C×V: one claim of C channels with V vouchers each since their last claim)")
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
    // A channel each, the warm-up's and those of every claim.
    let channel_payers: Vec<PrivateKeySigner> =
        (0..1 + sizes.iter().sum::<usize>()).map(|_| PrivateKeySigner::random()).collect();
    let addresses: Vec<_> = payers.iter().chain(&channel_payers).map(PrivateKeySigner::address).collect();
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
        let signature = payer
            .sign_hash_sync(&domain.signing_hash(&message))
            .map_err(|e| Error::Measure(format!("signing: {e}")))?;
        Ok(transfer_with_authorization_calldata(&message, &signature.as_bytes()))
    };
    // `n` payments: each payer pays `per_payer` times in a row.
    let mut payers = payers.iter();
    let mut payments = |n: usize| -> Result<Vec<Bytes>> {
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let payer = payers.next().ok_or_else(|| Error::Measure("ran out of payers".into()))?;
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
    let mut report =
        GasReport { per_payer, direct: direct / DIRECT_SAMPLES as u64, batched: Vec::new(), channel: Vec::new() };
    for &rows in sizes {
        progress(&format!("settling {rows} payments in one batch"));
        let calls = payments(rows)?.into_iter().map(|input| (net.token, input));
        let gas = send(&chain, MULTICALL3_ADDRESS, aggregate3_calldata(calls)).await?;
        report.batched.push((rows, gas / rows as u64));
    }

    progress(&format!("opening {} channels", channel_payers.len()));
    let channels = Channels::open(&chain, &net, &domain, &channel_payers).await?;
    // The receiver's first settle from the contract costs more: not measured.
    channels.claim(&chain, 0..1).await?;
    let mut first = 1;
    for &rows in sizes {
        progress(&format!("claiming {rows} channels in one transaction"));
        let gas = channels.claim(&chain, first..first + rows).await?;
        report.channel.push((rows, gas / rows as u64));
        first += rows;
    }
    Ok(report)
}

/// Funded channels, a payer each, paying `PAY_TO`.
struct Channels {
    contract: Address,
    domain: ChannelDomain,
    authorizer: PrivateKeySigner,
    token: Address,
    /// Each channel's config and its payer's voucher for `VALUE`.
    vouchers: Vec<(ChannelConfig, Bytes)>,
}

impl Channels {
    /// Deposits `VALUE` into a channel of each payer, 100 deposits per
    /// transaction (the contract's `multicall`), and signs a voucher of
    /// `VALUE` in each.
    async fn open(
        chain: &AlloyChain,
        net: &devnet::Devnet,
        token_domain: &Eip3009Domain,
        payers: &[PrivateKeySigner],
    ) -> Result<Self> {
        let domain = ChannelDomain::new(chain.chain_id(), net.channels);
        let authorizer = PrivateKeySigner::random();
        let mut vouchers = Vec::with_capacity(payers.len());
        let mut deposits = Vec::with_capacity(payers.len());
        for payer in payers {
            let config = ChannelConfig {
                payer: payer.address(),
                payerAuthorizer: payer.address(),
                receiver: PAY_TO,
                receiverAuthorizer: authorizer.address(),
                token: net.token,
                withdrawDelay: alloy::primitives::aliases::U40::from(900),
                salt: B256::ZERO,
            };
            let id = domain.channel_id(&config);
            let message = ReceiveWithAuthorization {
                from: payer.address(),
                to: net.deposit_collector,
                value: U256::from(VALUE),
                validAfter: U256::ZERO,
                validBefore: U256::from(u64::MAX),
                nonce: deposit_nonce(id, U256::ZERO),
            };
            let signature = sign(payer, token_domain.signing_hash(&message))?;
            let data = deposit_collector_data(U256::ZERO, U256::from(u64::MAX), U256::ZERO, &signature);
            deposits.push(deposit_calldata(&config, u128::from(VALUE), net.deposit_collector, data));
            let voucher = Voucher { channelId: id, maxClaimableAmount: u128::from(VALUE) };
            vouchers.push((config, Bytes::copy_from_slice(&sign(payer, domain.voucher_digest(&voucher))?)));
        }
        for chunk in deposits.chunks(100) {
            let input: Bytes = C::multicallCall { data: chunk.to_vec() }.abi_encode().into();
            send(chain, net.channels, input).await?;
        }
        Ok(Self { contract: net.channels, domain, authorizer, token: net.token, vouchers })
    }

    /// Claims all of the channels in `range` and settles the receiver, in
    /// one transaction; returns its gas.
    async fn claim(&self, chain: &AlloyChain, range: std::ops::Range<usize>) -> Result<u64> {
        let rows: Vec<ClaimRow> = self.vouchers[range]
            .iter()
            .map(|(config, signature)| ClaimRow {
                config: config.clone(),
                channel_id: self.domain.channel_id(config),
                max_claimable: u128::from(VALUE),
                signature: signature.clone(),
                total_claimed: u128::from(VALUE),
            })
            .collect();
        let batch = sign(&self.authorizer, self.domain.claim_batch_digest(&claim_batch(&rows)))?;
        let input = claim_and_settle_calldata(&rows, &batch, &[(PAY_TO, self.token)], &[]);
        let receipt = mined(chain, self.contract, input).await?;
        if !receipt.success {
            return Err(Error::Measure("a claim reverted".into()));
        }
        Ok(receipt.gas_used)
    }
}

fn sign(key: &PrivateKeySigner, digest: B256) -> Result<[u8; 65]> {
    Ok(key.sign_hash_sync(&digest).map_err(|e| Error::Measure(format!("signing: {e}")))?.as_bytes())
}

/// Sends one call and waits for its receipt.
async fn mined(chain: &AlloyChain, to: Address, input: Bytes) -> Result<x402_chain::Receipt> {
    let gas = chain.estimate_gas(to, input.clone()).await?;
    let tx = chain.sign_call(to, input, Some(gas)).await?;
    chain.broadcast(&tx).await?;
    chain
        .wait_receipt(&[tx.hash], Duration::from_secs(30))
        .await?
        .ok_or_else(|| Error::Measure(format!("{} was not mined", tx.hash)))
}

/// Sends one call and returns its gas used; every payment in it must settle.
async fn send(chain: &AlloyChain, to: Address, input: Bytes) -> Result<u64> {
    let receipt = mined(chain, to, input).await?;
    if !receipt.success || receipt.authorizations_used.is_empty() {
        return Err(Error::Measure(format!("{} did not settle its payments", receipt.tx)));
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
