//! [`AlloyChain`]: reads and transactions on an EVM node through alloy.
//!
//! The transaction manager owns everything that makes a settlement
//! transaction: a pool of signer keys, each with a locally tracked nonce
//! (fetched once, then counted here, resynced when the node disagrees),
//! EIP-1559 fees from the node, and gas limits estimated once per call kind
//! (function selector) and cached with a safety margin.
//!
//! Signing and broadcasting are separate steps so the caller can write the
//! signed raw transaction to its ledger (a write-ahead intent) before it
//! leaves the process; after a crash the same bytes can be rebroadcast.
//! Receipts are polled at a short configurable interval, not alloy's
//! multi-second default for remote nodes.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use alloy::{
    consensus::{Transaction, TxEnvelope},
    eips::eip2718::{Decodable2718, Encodable2718},
    network::{EthereumWallet, NetworkTransactionBuilder, TransactionBuilder},
    primitives::{Address, B256, Bytes, U256},
    providers::{Provider, ProviderBuilder, RootProvider},
    rpc::types::{Filter, TransactionReceipt, TransactionRequest},
    signers::local::PrivateKeySigner,
    sol_types::{SolCall, SolEvent},
};
use alloy::{
    rpc::client::ClientBuilder,
    transports::layers::{RateLimitRetryPolicy, RetryBackoffLayer, RetryPolicy},
};
use tokio::sync::Mutex;

use crate::{
    Error, Result,
    chain::{AuthorizationSpent, AuthorizationUsed, Chain, ChannelLog, Receipt, TransferLog},
    eip3009::IEip3009,
};

/// Transaction manager settings.
#[derive(Clone, Debug)]
pub struct TxConfig {
    /// How often to ask for a receipt.
    pub receipt_poll: Duration,
    /// Blocks on top of the including block before a receipt counts.
    pub confirmations: u64,
    /// Added to estimated gas limits, in percent.
    pub gas_margin_percent: u64,
    /// Longest wait for one answer of the node (connecting included): a
    /// node that accepts a request and never answers is an error after
    /// this, retried like any other, not a settler waiting forever.
    pub rpc_timeout: Duration,
}

impl Default for TxConfig {
    fn default() -> Self {
        Self {
            receipt_poll: Duration::from_millis(200),
            confirmations: 1,
            gas_margin_percent: 25,
            rpc_timeout: Duration::from_secs(10),
        }
    }
}

/// A signed transaction, ready to record and broadcast.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedTx {
    /// The transaction hash.
    pub hash: B256,
    /// The EIP-2718 encoding, as broadcast.
    pub raw: Bytes,
    /// The settlement signer that signed it.
    pub signer: Address,
    /// Its nonce in the signer's sequence.
    pub nonce: u64,
    /// The contract called.
    pub to: Address,
    /// The calldata.
    pub input: Bytes,
    /// Gas limit.
    pub gas_limit: u64,
    /// EIP-1559 fee cap per gas, in wei.
    pub max_fee_per_gas: u128,
    /// EIP-1559 priority fee per gas, in wei.
    pub max_priority_fee_per_gas: u128,
}

impl SignedTx {
    /// Rebuilds a signed transaction from its EIP-2718 bytes, as recorded
    /// in a write-ahead intent, and the signer that made it.
    pub fn from_raw(raw: Bytes, signer: Address) -> Result<Self> {
        let envelope = decode(&raw)?;
        Ok(Self {
            hash: *envelope.tx_hash(),
            signer,
            nonce: envelope.nonce(),
            to: envelope.to().unwrap_or_default(),
            input: envelope.input().clone(),
            gas_limit: envelope.gas_limit(),
            max_fee_per_gas: envelope.max_fee_per_gas(),
            max_priority_fee_per_gas: envelope.max_priority_fee_per_gas().unwrap_or_default(),
            raw,
        })
    }
}

fn decode(raw: &Bytes) -> Result<TxEnvelope> {
    TxEnvelope::decode_2718(&mut raw.as_ref()).map_err(|e| Error::Sign(format!("decoding a signed transaction: {e}")))
}

/// The retry layer of every node client, its answer to a provider's rate
/// limit (HTTP 429 or 503, `-32005` and the other answers alloy knows): up
/// to 3 retries, 100 ms apart (or as long as the provider asks, up to 2 s),
/// before the caller sees the error. Settlement then retries on its own
/// schedule, with its own backoff; this only keeps a burst of rate limits
/// from reaching it. A revert is never retried (see [`NotReverts`]).
fn rate_limit_retries() -> RetryBackoffLayer<NotReverts> {
    /// Retries after the first attempt.
    const RETRIES: u32 = 3;
    /// The delay before each, milliseconds (fixed, not growing).
    const BACKOFF_MS: u64 = 100;
    /// The provider's compute budget alloy paces requests in flight
    /// against: high, so pacing adds nothing below thousands in flight.
    const COMPUTE_UNITS_PER_SECOND: u64 = 100_000;
    RetryBackoffLayer::new_with_policy(RETRIES, BACKOFF_MS, COMPUTE_UNITS_PER_SECOND, NotReverts)
}

/// alloy's rate-limit policy, except for the EVM's verdicts: alloy matches
/// rate limits partly by message, and a token's revert reason may well say
/// "rate limit"; retrying it would turn a revert into a provider error, and
/// a payment that must fail into one retried until it expires. A hint to
/// wait is capped, so one call cannot hold a signer's nonce lock or an
/// HTTP request for minutes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct NotReverts;

impl NotReverts {
    /// The longest wait a provider's hint gets.
    const MAX_HINT: Duration = Duration::from_secs(2);
}

impl RetryPolicy for NotReverts {
    fn should_retry(&self, error: &alloy::transports::TransportError) -> bool {
        let revert = error.as_error_resp().is_some_and(|e| is_revert(e.code, &e.message));
        !revert && RateLimitRetryPolicy::default().should_retry(error)
    }

    fn backoff_hint(&self, error: &alloy::transports::TransportError) -> Option<Duration> {
        RateLimitRetryPolicy::default().backoff_hint(error).map(|hint| hint.min(Self::MAX_HINT))
    }
}

/// An EVM node and the keys that pay for settlement transactions.
#[derive(Debug)]
pub struct AlloyChain {
    provider: RootProvider,
    chain_id: u64,
    signers: Vec<(Address, EthereumWallet)>,
    next_signer: AtomicUsize,
    /// Next nonce per signer, once known.
    nonces: Mutex<HashMap<Address, u64>>,
    /// Gas limit per function selector.
    gas: Mutex<HashMap<GasKey, u64>>,
    config: TxConfig,
}

impl AlloyChain {
    /// Connects to the JSON-RPC endpoint `url` with `signers` paying for
    /// transactions.
    pub async fn connect(url: &str, signers: Vec<PrivateKeySigner>, config: TxConfig) -> Result<Self> {
        // Not quoted: an RPC URL often holds the provider's API key.
        let url = url.parse().map_err(|e| Error::Config(format!("the rpc url does not parse: {e}")))?;
        let http = reqwest::Client::builder()
            .timeout(config.rpc_timeout)
            .connect_timeout(config.rpc_timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| Error::Config(format!("the HTTP client for the node: {e}")))?;
        let client = ClientBuilder::default().layer(rate_limit_retries()).http_with_client(http, url);
        let provider = ProviderBuilder::default().connect_client(client);
        let chain_id = provider.get_chain_id().await?;
        Ok(Self::with_provider(provider, chain_id, signers, config))
    }

    /// On `provider`, whose chain is `chain_id` (tests: a mocked node).
    fn with_provider(provider: RootProvider, chain_id: u64, signers: Vec<PrivateKeySigner>, config: TxConfig) -> Self {
        let signers = signers.into_iter().map(|s| (s.address(), EthereumWallet::from(s))).collect();
        Self {
            provider,
            chain_id,
            signers,
            next_signer: AtomicUsize::new(0),
            nonces: Mutex::new(HashMap::new()),
            gas: Mutex::new(HashMap::new()),
            config,
        }
    }

    /// Signs `request` (nonce, gas and fees already set) with `signer`'s key.
    async fn sign(&self, signer: Address, request: TransactionRequest) -> Result<SignedTx> {
        let wallet = self
            .signers
            .iter()
            .find(|(a, _)| *a == signer)
            .map(|(_, w)| w)
            .ok_or_else(|| Error::Config(format!("{signer} is not a settlement signer")))?;
        let (to, input, nonce, gas_limit) = (
            request.to.and_then(|k| k.to().copied()).unwrap_or_default(),
            request.input.input().cloned().unwrap_or_default(),
            request.nonce.unwrap_or_default(),
            request.gas.unwrap_or_default(),
        );
        let (max_fee_per_gas, max_priority_fee_per_gas) =
            (request.max_fee_per_gas.unwrap_or_default(), request.max_priority_fee_per_gas.unwrap_or_default());
        let envelope = request.build(wallet).await.map_err(|e| Error::Sign(e.to_string()))?;
        Ok(SignedTx {
            hash: *envelope.tx_hash(),
            raw: envelope.encoded_2718().into(),
            signer,
            nonce,
            to,
            input,
            gas_limit,
            max_fee_per_gas,
            max_priority_fee_per_gas,
        })
    }

    /// A zero-value transfer of `signer` to itself at `nonce`, sent, with
    /// fees at least `floor` (max fee, priority fee) and the market's.
    async fn fill(&self, signer: Address, nonce: u64, floor: (u128, u128)) -> Result<()> {
        let market = self.provider.estimate_eip1559_fees().await?;
        let priority = floor.1.max(market.max_priority_fee_per_gas);
        let request = TransactionRequest::default()
            .with_from(signer)
            .with_to(signer)
            .with_chain_id(self.chain_id)
            .with_nonce(nonce)
            .with_gas_limit(21_000)
            .with_max_fee_per_gas(floor.0.max(market.max_fee_per_gas).max(priority))
            .with_max_priority_fee_per_gas(priority);
        let filler = self.sign(signer, request).await?;
        tracing::warn!(%signer, nonce, tx = %filler.hash, "filling a nonce whose transaction was never sent");
        self.broadcast(&filler).await
    }

    /// Forgets `signer`'s local nonce; the next transaction asks the node.
    pub async fn resync_nonce(&self, signer: Address) -> Result<()> {
        let pending = self.provider.get_transaction_count(signer).pending().await?;
        self.nonces.lock().await.insert(signer, pending);
        tracing::debug!(%signer, pending, "nonce resynced from the node");
        Ok(())
    }

    async fn take_nonce(&self, signer: Address) -> Result<u64> {
        let mut nonces = self.nonces.lock().await;
        let next = match nonces.get(&signer) {
            Some(n) => *n,
            None => self.provider.get_transaction_count(signer).pending().await?,
        };
        nonces.insert(signer, next + 1);
        Ok(next)
    }

    /// The estimated gas (with margin) of a kind of call, cached per
    /// contract, selector and calldata length. Meant for calls whose cost
    /// does not depend on their arguments (`transferWithAuthorization`);
    /// callers of anything else pass their own estimate to `sign_call`.
    async fn gas_limit(&self, to: Address, input: &Bytes) -> Result<u64> {
        let selector: [u8; 4] = input.get(..4).and_then(|s| s.try_into().ok()).unwrap_or_default();
        let key = (to, selector, input.len());
        if let Some(gas) = self.gas.lock().await.get(&key) {
            return Ok(*gas);
        }
        let gas = self.estimate_gas(to, input.clone()).await?;
        self.gas.lock().await.insert(key, gas);
        Ok(gas)
    }
}

/// What a cached gas estimate is for: contract, selector, calldata length.
type GasKey = (Address, [u8; 4], usize);

impl Chain for AlloyChain {
    fn chain_id(&self) -> u64 {
        self.chain_id
    }

    fn signers(&self) -> Vec<Address> {
        self.signers.iter().map(|(a, _)| *a).collect()
    }

    async fn token_balance(&self, token: Address, owner: Address) -> Result<U256> {
        let input = IEip3009::balanceOfCall { account: owner }.abi_encode();
        let request = TransactionRequest::default().with_to(token).with_input(input);
        let out = self.provider.call(request).await?;
        // A call of an address without code succeeds with nothing.
        if out.is_empty() {
            return Err(Error::NoContract(token));
        }
        IEip3009::balanceOfCall::abi_decode_returns(&out).map_err(|e| Error::Decode(format!("balanceOf: {e}")))
    }

    async fn has_code(&self, address: Address) -> Result<bool> {
        Ok(!self.provider.get_code_at(address).await?.is_empty())
    }

    async fn authorization_state(&self, token: Address, authorizer: Address, nonce: B256) -> Result<bool> {
        Ok(IEip3009::new(token, &self.provider).authorizationState(authorizer, nonce).call().await?)
    }

    async fn block_number(&self) -> Result<u64> {
        Ok(self.provider.get_block_number().await?)
    }

    async fn block_hash(&self, number: u64) -> Result<Option<B256>> {
        Ok(self.provider.get_block_by_number(number.into()).await?.map(|b| b.header.hash))
    }

    async fn authorization_spent(
        &self,
        token: Address,
        authorizer: Address,
        nonce: B256,
        from: u64,
        to: u64,
    ) -> Result<Option<AuthorizationSpent>> {
        let filter = Filter::new()
            .address(token)
            .event_signature(vec![
                IEip3009::AuthorizationUsed::SIGNATURE_HASH,
                IEip3009::AuthorizationCanceled::SIGNATURE_HASH,
            ])
            .topic1(authorizer.into_word())
            .topic2(nonce)
            .from_block(from)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await?;
        let Some(log) = logs.iter().find(|l| l.transaction_hash.is_some() && l.block_number.is_some()) else {
            return Ok(None);
        };
        let (tx, block) = (log.transaction_hash.expect("found"), log.block_number.expect("found"));
        let canceled = log.topic0() == Some(&IEip3009::AuthorizationCanceled::SIGNATURE_HASH);
        let header = self.provider.get_block_by_number(block.into()).await?;
        let timestamp = header.map(|b| b.header.timestamp).ok_or_else(|| Error::Decode(format!("no block {block}")))?;
        let mut transfer = None;
        if !canceled && let Some(receipt) = self.provider.get_transaction_receipt(tx).await? {
            // The transfer is the token's next log of the same transaction.
            let logs = receipt.inner.logs();
            let at = logs.iter().position(|l| l.log_index == log.log_index);
            transfer = at
                .and_then(|i| logs[i + 1..].iter().find(|l| l.address() == token))
                .and_then(|l| IEip3009::Transfer::decode_log(&l.inner).ok())
                .filter(|t| t.from == authorizer)
                .map(|t| (t.to, t.value));
        }
        Ok(Some(AuthorizationSpent { tx, block, timestamp, canceled, transfer }))
    }

    async fn transfer_logs(&self, token: Address, from: u64, to: u64) -> Result<Vec<TransferLog>> {
        let filter = Filter::new()
            .address(token)
            .event_signature(IEip3009::Transfer::SIGNATURE_HASH)
            .from_block(from)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await?;
        Ok(logs
            .iter()
            .filter_map(|log| {
                let event = IEip3009::Transfer::decode_log(&log.inner).ok()?;
                Some(TransferLog { block: log.block_number?, from: event.from, to: event.to, value: event.value })
            })
            .collect())
    }

    async fn channel_logs(&self, contract: Address, from: u64, to: u64) -> Result<Vec<ChannelLog>> {
        use crate::contracts::X402BatchSettlement as C;
        let filter = Filter::new()
            .address(contract)
            .event_signature(vec![
                C::Deposited::SIGNATURE_HASH,
                C::Claimed::SIGNATURE_HASH,
                C::Refunded::SIGNATURE_HASH,
                C::WithdrawInitiated::SIGNATURE_HASH,
                C::WithdrawFinalized::SIGNATURE_HASH,
            ])
            .from_block(from)
            .to_block(to);
        let logs = self.provider.get_logs(&filter).await?;
        Ok(logs
            .iter()
            .filter_map(|log| {
                let topics = log.topics();
                Some(ChannelLog {
                    block: log.block_number?,
                    channel_id: *topics.get(1)?,
                    withdraw_initiated: topics.first() == Some(&C::WithdrawInitiated::SIGNATURE_HASH),
                })
            })
            .collect())
    }

    async fn simulate(&self, to: Address, input: Bytes) -> Result<Option<String>> {
        match self.call(to, input).await {
            Ok(_) => Ok(None),
            Err(Error::Rpc(alloy::transports::RpcError::ErrorResp(payload)))
                if is_revert(payload.code, &payload.message) =>
            {
                Ok(Some(payload.message.to_string()))
            }
            Err(err) => Err(err),
        }
    }

    async fn call(&self, to: Address, input: Bytes) -> Result<Bytes> {
        let from = self.signers.first().map(|(a, _)| *a).unwrap_or_default();
        let request = TransactionRequest::default().with_from(from).with_to(to).with_input(input);
        Ok(self.provider.call(request).await?)
    }

    async fn probe(&self, input: Bytes, time: u64) -> Result<Bytes> {
        use alloy::rpc::types::{BlockOverrides, state::AccountOverride};
        let probe = crate::signature::PROBE_ADDRESS;
        let request = TransactionRequest::default().with_to(probe).with_input(input);
        let code = AccountOverride {
            code: Some(crate::contracts::X402SignatureProbe::DEPLOYED_BYTECODE.clone()),
            ..AccountOverride::default()
        };
        let block = BlockOverrides { time: Some(time), ..BlockOverrides::default() };
        Ok(self.provider.call(request).account_override(probe, code).with_block_overrides(block).await?)
    }

    async fn estimate_gas(&self, to: Address, input: Bytes) -> Result<u64> {
        let from = self.signers.first().map(|(a, _)| *a).unwrap_or_default();
        let request = TransactionRequest::default().with_from(from).with_to(to).with_input(input);
        let estimate = self.provider.estimate_gas(request).await?;
        Ok(estimate + estimate * self.config.gas_margin_percent / 100)
    }

    async fn block_gas_limit(&self) -> Result<u64> {
        let block = self.provider.get_block_by_number(alloy::eips::BlockNumberOrTag::Latest).await?;
        block.map(|b| b.header.gas_limit).ok_or_else(|| Error::Decode("the node has no latest block".into()))
    }

    async fn head_time(&self) -> Result<u64> {
        let block = self.provider.get_block_by_number(alloy::eips::BlockNumberOrTag::Latest).await?;
        block.map(|b| b.header.timestamp).ok_or_else(|| Error::Decode("the node has no latest block".into()))
    }

    async fn sign_call(&self, to: Address, input: Bytes, gas_limit: Option<u64>) -> Result<SignedTx> {
        let index = self.next_signer.fetch_add(1, Ordering::Relaxed) % self.signers.len().max(1);
        let signer = self.signers.get(index).map(|(a, _)| *a).ok_or_else(|| Error::Config("no signer keys".into()))?;
        let gas_limit = match gas_limit {
            Some(gas) => gas,
            None => self.gas_limit(to, &input).await?,
        };
        let fees = self.provider.estimate_eip1559_fees().await?;
        let nonce = self.take_nonce(signer).await?;
        let request = TransactionRequest::default()
            .with_from(signer)
            .with_to(to)
            .with_input(input)
            .with_chain_id(self.chain_id)
            .with_nonce(nonce)
            .with_gas_limit(gas_limit)
            .with_max_fee_per_gas(fees.max_fee_per_gas)
            .with_max_priority_fee_per_gas(fees.max_priority_fee_per_gas);
        self.sign(signer, request).await
    }

    async fn bump(&self, tx: &SignedTx) -> Result<SignedTx> {
        let market = self.provider.estimate_eip1559_fees().await?;
        // Nodes take a replacement whose fees are both at least 10% higher.
        let raise = |old: u128| old + old / 8 + 1;
        let priority = raise(tx.max_priority_fee_per_gas).max(market.max_priority_fee_per_gas);
        let max_fee = raise(tx.max_fee_per_gas).max(market.max_fee_per_gas).max(priority);
        let request = TransactionRequest::default()
            .with_from(tx.signer)
            .with_to(tx.to)
            .with_input(tx.input.clone())
            .with_chain_id(self.chain_id)
            .with_nonce(tx.nonce)
            .with_gas_limit(tx.gas_limit)
            .with_max_fee_per_gas(max_fee)
            .with_max_priority_fee_per_gas(priority);
        self.sign(tx.signer, request).await
    }

    async fn floor_nonce(&self, signer: Address, next: u64) -> Result<()> {
        let mut nonces = self.nonces.lock().await;
        let current = match nonces.get(&signer) {
            Some(n) => *n,
            None => self.provider.get_transaction_count(signer).pending().await?,
        };
        if next > current {
            tracing::info!(%signer, node = current, next, "nonce raised past the recorded intents");
        }
        nonces.insert(signer, current.max(next));
        Ok(())
    }

    async fn fill_gaps(&self, signer: Address, below: u64, held: &[u64]) -> Result<u64> {
        let next = self.provider.get_transaction_count(signer).pending().await?;
        let mut filled = 0;
        // Each nonce on its own: one that cannot be filled now (the node
        // failed to answer) does not keep the others unfilled.
        for nonce in (next..below).filter(|n| !held.contains(n)) {
            for attempt in 1..=3u32 {
                match self.fill(signer, nonce, (0, 0)).await {
                    Ok(()) => {
                        filled += 1;
                        break;
                    }
                    // Used meanwhile, or held by a transaction in the pool: no gap.
                    Err(Error::NonceTooLow { .. }) => break,
                    Err(err) if err.to_string().to_lowercase().contains("underpriced") => break,
                    Err(err) => {
                        tracing::warn!(%signer, nonce, %err, attempt, "filling a nonce gap failed");
                        tokio::time::sleep(std::time::Duration::from_millis(200 << attempt)).await;
                    }
                }
            }
        }
        Ok(filled)
    }

    async fn fill_nonce(&self, tx: &SignedTx) -> Result<()> {
        self.fill(tx.signer, tx.nonce, (tx.max_fee_per_gas, tx.max_priority_fee_per_gas)).await
    }

    async fn broadcast(&self, tx: &SignedTx) -> Result<()> {
        match self.provider.send_raw_transaction(&tx.raw).await {
            Ok(_) => Ok(()),
            Err(err) => {
                let message = err.to_string().to_lowercase();
                if message.contains("already known") || message.contains("already imported") {
                    return Ok(());
                }
                if message.contains("nonce too low") {
                    // Mined already (a rebroadcast)? Then all is well.
                    if self.provider.get_transaction_receipt(tx.hash).await?.is_some() {
                        return Ok(());
                    }
                    self.resync_nonce(tx.signer).await?;
                    return Err(Error::NonceTooLow { signer: tx.signer, nonce: tx.nonce });
                }
                Err(err.into())
            }
        }
    }

    fn confirmations(&self) -> u64 {
        self.config.confirmations
    }

    async fn receipt(&self, hash: B256) -> Result<Option<Receipt>> {
        let Some(receipt) = self.provider.get_transaction_receipt(hash).await? else { return Ok(None) };
        let (Some(block), Some(block_hash)) = (receipt.block_number, receipt.block_hash) else { return Ok(None) };
        let head = self.block_number().await?;
        Ok(Some(Receipt {
            tx: hash,
            block,
            block_hash,
            confirmations: (head + 1).saturating_sub(block),
            success: receipt.status(),
            gas_used: receipt.gas_used,
            effective_gas_price: receipt.effective_gas_price,
            authorizations_used: authorizations_used(&receipt),
        }))
    }

    async fn wait_receipt(&self, hashes: &[B256], timeout: Duration) -> Result<Option<Receipt>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            for hash in hashes.iter().rev() {
                if let Some(receipt) = self.receipt(*hash).await?
                    && receipt.confirmations >= self.config.confirmations
                {
                    return Ok(Some(receipt));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(self.config.receipt_poll).await;
        }
    }
}

/// The `AuthorizationUsed` logs of a receipt.
fn authorizations_used(receipt: &TransactionReceipt) -> Vec<AuthorizationUsed> {
    receipt
        .logs()
        .iter()
        .filter_map(|log| {
            let event = IEip3009::AuthorizationUsed::decode_log(&log.inner).ok()?;
            Some(AuthorizationUsed { token: log.address(), authorizer: event.authorizer, nonce: event.nonce })
        })
        .collect()
}

/// Whether a JSON-RPC error answer is the EVM's verdict that the call
/// reverts (geth's and anvil's code 3 with revert data, or a message that
/// says so), as opposed to the provider failing to answer: a rate limit
/// (-32005, HTTP 429 with a JSON-RPC body), a timeout, "header not found".
/// Only a revert may fail a payment; anything else is retried.
pub fn is_revert(code: i64, message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    // -32015 "VM execution error." is Nethermind's and OpenEthereum's.
    code == 3 || message.contains("revert") || (code == -32015 && message.contains("vm execution error"))
}

#[cfg(test)]
mod revert_tests {
    use super::is_revert;

    #[test]
    fn only_execution_reverts_are_reverts() {
        assert!(is_revert(3, "execution reverted: FiatTokenV2: authorization is used or canceled"));
        assert!(is_revert(-32000, "execution reverted"));
        assert!(is_revert(-32015, "VM execution error."));
        for (code, message) in [
            (-32005, "request rate exceeded"),
            (429, "Too Many Requests"),
            (-32000, "header not found"),
            (-32603, "request timed out"),
            (-32000, "missing trie node"),
        ] {
            assert!(!is_revert(code, message), "{code} {message}");
        }
    }
}

/// `AlloyChain`'s error paths against a scripted node (alloy's mock
/// transport): each test queues the node's answers, in order, and checks
/// what settlement is told.
#[cfg(test)]
mod mock_tests {
    use alloy::transports::mock::{Asserter, MockResponse};

    use super::*;

    #[tokio::test]
    async fn a_rate_limit_is_retried_by_the_client_before_settlement_sees_it() {
        let (chain, asserter) = chain();
        push_error(&asserter, -32005, "request rate exceeded");
        push_error(&asserter, 429, "Too Many Requests");
        asserter.push_success(&Bytes::from_static(&[0xab]));
        assert_eq!(chain.call(Address::repeat_byte(1), Bytes::new()).await.unwrap(), Bytes::from_static(&[0xab]));
        // A verdict is not retried, even one whose reason reads like a rate limit.
        push_error(&asserter, 3, "execution reverted: rate limit exceeded for this account");
        asserter.push_success(&Bytes::new());
        let verdict = chain.simulate(Address::repeat_byte(1), Bytes::new()).await.unwrap();
        assert_eq!(verdict.as_deref(), Some("execution reverted: rate limit exceeded for this account"));
        assert_eq!(asserter.read_q().len(), 1, "the revert was answered at once");
    }

    /// A chain on a scripted node, through the same retry layer as a
    /// connected one.
    fn chain() -> (AlloyChain, Asserter) {
        let asserter = Asserter::new();
        let client = ClientBuilder::default()
            .layer(rate_limit_retries())
            .transport(alloy::transports::mock::MockTransport::new(asserter.clone()), true);
        let provider = ProviderBuilder::default().connect_client(client);
        (AlloyChain::with_provider(provider, 31337, vec![PrivateKeySigner::random()], TxConfig::default()), asserter)
    }

    /// Queues a JSON-RPC error answer.
    fn push_error(asserter: &Asserter, code: i64, message: &'static str) {
        asserter.push_failure_msg(message);
        if let Some(MockResponse::Failure(payload)) = asserter.write_q().back_mut() {
            payload.code = code;
        }
    }

    /// A transaction signed locally (no node asked) with `nonce`.
    async fn signed(chain: &AlloyChain, nonce: u64) -> SignedTx {
        let signer = chain.signers()[0];
        let request = TransactionRequest::default()
            .with_from(signer)
            .with_to(Address::repeat_byte(7))
            .with_input(Bytes::from_static(&[1, 2, 3, 4]))
            .with_chain_id(31337)
            .with_nonce(nonce)
            .with_gas_limit(60_000)
            .with_max_fee_per_gas(2_000_000_000)
            .with_max_priority_fee_per_gas(1_000_000_000);
        chain.sign(signer, request).await.unwrap()
    }

    #[tokio::test]
    async fn a_revert_is_a_verdict_and_a_provider_error_is_not() {
        let (chain, asserter) = chain();
        push_error(&asserter, 3, "execution reverted: FiatTokenV2: authorization is used or canceled");
        let verdict = chain.simulate(Address::repeat_byte(1), Bytes::new()).await.unwrap();
        assert_eq!(verdict.as_deref(), Some("execution reverted: FiatTokenV2: authorization is used or canceled"));

        for (code, message) in
            [(-32005, "request rate exceeded"), (-32000, "header not found"), (429, "Too Many Requests")]
        {
            push_error(&asserter, code, message);
            let err = chain.simulate(Address::repeat_byte(1), Bytes::new()).await.unwrap_err();
            assert!(err.is_retryable(), "{code} {message}: {err}");
        }
        // A node that answers nothing at all.
        let err = chain.simulate(Address::repeat_byte(1), Bytes::new()).await.unwrap_err();
        assert!(err.is_retryable(), "{err}");
    }

    #[tokio::test]
    async fn a_rebroadcast_the_node_knows_is_sent() {
        let (chain, asserter) = chain();
        let tx = signed(&chain, 4).await;
        assert_eq!(tx.nonce, 4);
        for known in ["already known", "transaction already imported", "ALREADY KNOWN"] {
            push_error(&asserter, -32000, known);
            chain.broadcast(&tx).await.unwrap_or_else(|e| panic!("{known}: {e}"));
        }
        assert!(asserter.read_q().is_empty(), "nothing else was asked");
    }

    #[tokio::test]
    async fn a_nonce_used_elsewhere_resyncs_and_is_retryable() {
        let (chain, asserter) = chain();
        let tx = signed(&chain, 4).await;
        push_error(&asserter, -32000, "nonce too low: next nonce 9, tx nonce 4");
        asserter.push_success(&serde_json::Value::Null); // eth_getTransactionReceipt: not mined
        asserter.push_success(&U256::from(9)); // eth_getTransactionCount (pending)
        let err = chain.broadcast(&tx).await.unwrap_err();
        assert!(matches!(err, Error::NonceTooLow { nonce: 4, .. }), "{err}");
        assert!(err.is_retryable());
        assert_eq!(chain.take_nonce(tx.signer).await.unwrap(), 9, "the next transaction takes the node's nonce");
    }

    #[tokio::test]
    async fn a_refused_broadcast_is_an_error_with_the_nodes_reason() {
        let (chain, asserter) = chain();
        let tx = signed(&chain, 0).await;
        push_error(&asserter, -32000, "insufficient funds for gas * price + value");
        let err = chain.broadcast(&tx).await.unwrap_err();
        assert!(err.to_string().contains("insufficient funds"), "{err}");
        assert!(asserter.read_q().is_empty(), "not retried, nothing else asked");
    }
}
