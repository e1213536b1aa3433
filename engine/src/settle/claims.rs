//! Claims of `batch-settlement` channels: the engine holds the receiver
//! authorizer's key, follows the channel contract's events, and claims the
//! vouchers it recorded by each merchant's policy.
//!
//! ```text
//!  every poll:  channel records made durable since the last poll (all, the first time) ──► read from the ledger into the book
//!               contract events since the last block ──► channels they name re-read on chain, mirrored in the shards
//!               channels due (interval, threshold, withdrawal) ──► re-read, 200 per eth_call ──► rows: charged total under the voucher
//!               rows, up to `max_rows` per transaction ──► ClaimBatch signed by the receiver authorizer
//!               multicall(claimWithSignature(rows), settle(receiver, token)...) ──► send (write-ahead intent)
//!               receipt ──► claimed channels re-read and mirrored, with the claim time
//! ```
//!
//! A claim is idempotent on chain: a row at or below a channel's claimed
//! total changes nothing, and `settle` with nothing claimed pays nothing.
//! So a claim transaction sent again after a crash, or a round that claims
//! a channel another round already claimed, never claims twice. The claim
//! transaction is a write-ahead intent like any settlement, so it is
//! followed, fee-bumped, rebroadcast after a restart and re-sent after a
//! reorg by the same code as `direct` and `batched` settlements.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use alloy::{
    primitives::{Address, B256, Bytes, U256},
    signers::{SignerSync, local::PrivateKeySigner},
};
use x402_chain::{
    Chain,
    channel::{ClaimRow, RefundRow, claim_and_settle_calldata, claim_batch, decode_states, states_calldata},
};
use x402_channel::{ChannelDomain, OnChain, Refund, Voucher};

use super::{Settler, chain_error};
use crate::{
    Result,
    channels::{Claimed, voucher_signer},
    domain::{ChannelRecord, IntentState, unix_millis},
};

/// Channels whose state one `eth_call` reads at most (about 10,000 gas
/// each, far below the `eth_call` gas caps of common nodes).
const READ_CHUNK: usize = 200;

/// The claims' view of their contract's channels, by id.
type Book = BTreeMap<B256, ChannelRecord>;

/// How channel claims are made.
#[derive(Clone, Debug)]
pub struct ClaimsConfig {
    /// The channel contract.
    pub contract: Address,
    /// The receiver authorizer's key: channels naming its address are
    /// claimed; others are only verified.
    pub authorizer: PrivateKeySigner,
    /// How often events are read and due claims looked for.
    pub poll: Duration,
    /// Rows per claim transaction at most.
    pub max_rows: usize,
}

impl ClaimsConfig {
    /// Claims for the channels `authorizer` authorizes on `contract`.
    pub fn new(contract: Address, authorizer: PrivateKeySigner) -> Self {
        Self { contract, authorizer, poll: Duration::from_millis(500), max_rows: 200 }
    }
}

/// What one claim round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClaimRound {
    /// Claim transactions sent.
    pub transactions: usize,
    /// Channel rows in them.
    pub rows: usize,
}

impl<C: Chain> Settler<C> {
    /// Follows the channel contract and claims due channels until aborted.
    pub(super) async fn run_claims(self: Arc<Self>, claims: ClaimsConfig) {
        // Channels may have moved while the engine was down: start from a
        // full refresh of those with anything unclaimed.
        let mut next_block = None;
        let mut book = None;
        loop {
            if let Err(err) = self.claims_round(&claims, &mut next_block, &mut book).await {
                tracing::warn!(%err, "a channel claim round failed; will retry");
            }
            tokio::time::sleep(claims.poll).await;
        }
    }

    /// Reads new contract events, mirrors the channels they name, then
    /// claims the due channels.
    async fn claims_round(
        &self,
        claims: &ClaimsConfig,
        next_block: &mut Option<u64>,
        book: &mut Option<Book>,
    ) -> Result<ClaimRound> {
        let head = self.chain.block_number().await.map_err(chain_error)?;
        let mine = self.book(claims, book).await?;
        let touched: Vec<B256> = match *next_block {
            None => mine
                .values()
                .filter(|r| r.channel.charged > r.channel.onchain.total_claimed)
                .map(|r| r.channel.id)
                .collect(),
            Some(from) if from <= head => {
                let logs = self.chain.channel_logs(claims.contract, from, head).await.map_err(chain_error)?;
                let mut ids: Vec<B256> = logs.iter().map(|l| l.channel_id).filter(|id| mine.contains_key(id)).collect();
                ids.sort_unstable();
                ids.dedup();
                if logs.iter().any(|l| l.withdraw_initiated) {
                    tracing::info!(
                        channels = ids.len(),
                        "a payer initiated a withdrawal; claiming before its delay ends"
                    );
                }
                ids
            }
            Some(_) => Vec::new(),
        };
        let records: Vec<&ChannelRecord> = touched.iter().map(|id| &mine[id]).collect();
        let states = self.read_channels(claims.contract, &records).await?;
        // Mirrored in the shards all at once, not a round trip each.
        futures::future::try_join_all(
            touched.iter().zip(&states).map(|(&id, &s)| self.engine.sync_channel(id, s, None)),
        )
        .await?;
        for (id, onchain) in touched.into_iter().zip(states) {
            mine.get_mut(&id).expect("filtered").channel.sync(onchain, unix_millis() / 1000);
        }
        *next_block = Some(head + 1);

        // A claim still pending (sent before a restart) goes first: the
        // settler's intent round resolves it.
        if self.claim_pending().await? {
            return Ok(ClaimRound::default());
        }
        let now = unix_millis() / 1000;
        let authorizer = claims.authorizer.address();
        let mut due = Vec::new();
        for record in mine.values() {
            let c = &record.channel;
            let requested = (record.claim_requested || record.refund_requested.is_some())
                .then_some(x402_channel::ClaimReason::Requested);
            // Most channels of a large book are idle, all claimed: skipped
            // before any lookup.
            if c.config.receiverAuthorizer != authorizer || (c.unclaimed() == 0 && requested.is_none()) {
                continue;
            }
            let Some(merchant) = self.engine.merchant(&record.merchant_id) else { continue };
            let policy = crate::channels::claim_policy(&merchant);
            if let Some(reason) = requested.or_else(|| c.claim_due(&policy, now, record.last_claim_at)) {
                tracing::debug!(channel = %c.id, ?reason, unclaimed = c.unclaimed(), "channel claim due");
                due.push((record.clone(), merchant.number));
            }
        }
        let mut round = ClaimRound::default();
        for chunk in due.chunks(claims.max_rows.max(1)) {
            let rows = self.claim(claims, chunk).await?;
            if rows > 0 {
                round.transactions += 1;
                round.rows += rows;
            }
        }
        Ok(round)
    }

    /// The channels of `claims.contract` as committed: read whole the first
    /// time, then only those the committer reported changed since.
    async fn book<'a>(&self, claims: &ClaimsConfig, book: &'a mut Option<Book>) -> Result<&'a mut Book> {
        let chain_id = self.chain.chain_id();
        let mine = |r: &ChannelRecord| r.chain_id == chain_id && r.contract == claims.contract;
        let changed = self.engine.changed_channels();
        match book {
            Some(channels) => {
                let ids = changed.take();
                if !ids.is_empty() {
                    match self.engine.channels_by_id(ids.iter().copied().collect()).await {
                        Ok(records) => channels.extend(records.into_iter().filter(mine).map(|r| (r.channel.id, r))),
                        Err(err) => {
                            changed.add(ids);
                            return Err(err);
                        }
                    }
                }
            }
            None => {
                // Whatever changed until now is in the whole read.
                changed.take();
                let records = self.engine.channels().await?;
                *book = Some(records.into_iter().filter(mine).map(|r| (r.channel.id, r)).collect());
            }
        }
        Ok(book.as_mut().expect("read above"))
    }

    /// Whether a claim transaction (an intent settling no payment) is still
    /// pending.
    async fn claim_pending(&self) -> Result<bool> {
        let chain_id = self.chain.chain_id();
        Ok(self
            .engine
            .intents()
            .await?
            .iter()
            .any(|i| i.chain_id == chain_id && i.payments.is_empty() && i.state == IntentState::Pending))
    }

    /// Claims `records` (re-read first) in one transaction, settles their
    /// receivers and makes the refunds asked for; returns the rows claimed.
    async fn claim(&self, claims: &ClaimsConfig, records: &[(ChannelRecord, u32)]) -> Result<usize> {
        let domain = ChannelDomain::new(self.chain.chain_id(), claims.contract);
        let mut rows = Vec::with_capacity(records.len());
        let mut settle = Vec::new();
        let mut refunds = Vec::new();
        let states = self.read_channels(claims.contract, &records.iter().map(|(r, _)| r).collect::<Vec<_>>()).await?;
        for ((record, _), onchain) in records.iter().zip(states) {
            let mut channel = record.channel.clone();
            channel.sync(onchain, unix_millis() / 1000);
            if let Some(requested) = record.refund_requested {
                let amount = channel.refundable(Some(requested));
                if amount > 0 {
                    let nonce = U256::from(channel.onchain.refund_nonce);
                    let digest = domain.refund_digest(&Refund { channelId: channel.id, nonce, amount });
                    let signature = self.authorize(claims, digest)?;
                    refunds.push(RefundRow { config: channel.config.clone(), amount, nonce, signature });
                }
            }
            let Some((entry, signature)) = channel.claim_entry() else { continue };
            // The pipeline checks vouchers of known channels against the
            // signer's key, which does not see `v`; the chain needs it right.
            let digest =
                domain.voucher_digest(&Voucher { channelId: channel.id, maxClaimableAmount: entry.maxClaimableAmount });
            let Some(signature) = crate::ecdsa::claimable(&signature, digest, voucher_signer(&channel.config)) else {
                tracing::error!(channel = %channel.id, "the channel's voucher is not its signer's: it cannot be claimed");
                continue;
            };
            let signature = Bytes::copy_from_slice(&signature);
            rows.push(ClaimRow {
                config: channel.config.clone(),
                channel_id: channel.id,
                max_claimable: entry.maxClaimableAmount,
                signature,
                total_claimed: entry.totalClaimed,
            });
            let receiver = (channel.config.receiver, channel.config.token);
            if !settle.contains(&receiver) {
                settle.push(receiver);
            }
        }
        if rows.is_empty() && refunds.is_empty() {
            // Nothing to send; a request is served by finding nothing to do.
            self.record_claimed(claims, records, None).await?;
            return Ok(0);
        }
        let signature = if rows.is_empty() {
            Vec::new()
        } else {
            self.authorize(claims, domain.claim_batch_digest(&claim_batch(&rows)))?.to_vec()
        };
        let input = claim_and_settle_calldata(&rows, &signature, &settle, &refunds);
        // The cost varies with the rows: estimated for each transaction.
        let gas = self.chain.estimate_gas(claims.contract, input.clone()).await.map_err(chain_error)?;
        let tx = self.chain.sign_call(claims.contract, input, Some(gas)).await.map_err(chain_error)?;
        let claimed: u128 = rows.iter().map(|r| r.total_claimed).sum();
        tracing::info!(
            tx = %tx.hash, rows = rows.len(), receivers = settle.len(), refunds = refunds.len(), claimed,
            "claiming channels"
        );
        metrics::histogram!(crate::metrics::CLAIM_ROWS).record(rows.len() as f64);
        let hash = tx.hash;
        self.claiming.store(true, std::sync::atomic::Ordering::Release);
        let sent = self.send(tx, Vec::new(), Vec::new()).await;
        self.claiming.store(false, std::sync::atomic::Ordering::Release);
        sent?;
        let block = match self.chain.receipt(hash).await.map_err(chain_error)? {
            Some(r) if r.success => Some((hash, r.block)),
            Some(r) => {
                // Nothing was claimed: no event, the requests stay.
                tracing::error!(tx = %hash, block = r.block, rows = rows.len(), "a claim transaction reverted");
                return Ok(0);
            }
            None => None,
        };
        self.record_claimed(claims, records, block).await?;
        Ok(rows.len())
    }

    /// Mirrors the channels a claim round served, with the transaction (if
    /// one was mined) as their event.
    async fn record_claimed(
        &self,
        claims: &ClaimsConfig,
        records: &[(ChannelRecord, u32)],
        mined: Option<(B256, u64)>,
    ) -> Result<()> {
        let at = unix_millis() / 1000;
        let states = self.read_channels(claims.contract, &records.iter().map(|(r, _)| r).collect::<Vec<_>>()).await?;
        let syncs = records.iter().zip(states).map(|((record, merchant_number), onchain)| {
            let claimed = Claimed {
                at,
                tx: mined.map_or(B256::ZERO, |m| m.0),
                block: mined.map_or(0, |m| m.1),
                merchant_number: *merchant_number,
                served_claim: record.claim_requested,
                served_refund: record.refund_requested,
            };
            // No transaction: the request is cleared, no event.
            let claimed = if mined.is_some() || record.claim_requested || record.refund_requested.is_some() {
                Some(claimed)
            } else {
                None
            };
            self.engine.sync_channel(record.channel.id, onchain, claimed)
        });
        futures::future::try_join_all(syncs).await?;
        Ok(())
    }

    /// The receiver authorizer's signature of `digest`.
    fn authorize(&self, claims: &ClaimsConfig, digest: B256) -> Result<[u8; 65]> {
        Ok(claims.authorizer.sign_hash_sync(&digest).map_err(|e| crate::Error::Config(e.to_string()))?.as_bytes())
    }

    /// The on-chain state of each of `records`, in order: one `eth_call`
    /// per [`READ_CHUNK`] channels.
    async fn read_channels(&self, contract: Address, records: &[&ChannelRecord]) -> Result<Vec<OnChain>> {
        let mut states = Vec::with_capacity(records.len());
        for chunk in records.chunks(READ_CHUNK) {
            let ids: Vec<B256> = chunk.iter().map(|r| r.channel.id).collect();
            let delays: Vec<u64> = chunk.iter().map(|r| r.channel.config.withdrawDelay.to::<u64>()).collect();
            let out = self.chain.call(contract, states_calldata(&ids)).await.map_err(chain_error)?;
            states.extend(decode_states(&out, &delays).map_err(chain_error)?);
        }
        Ok(states)
    }
}
