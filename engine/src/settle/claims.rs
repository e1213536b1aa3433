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
//! Every claim transaction is simulated first. When it would revert (a
//! payer whose code now refuses its voucher, a receiver the token
//! blacklists, a paused token), the channels are bisected until each
//! reverting part stands alone; the others are claimed in one transaction,
//! and each reverting channel is quarantined: left out of claims, then
//! tried again after a backoff that doubles up to
//! [`ClaimsConfig::max_quarantine`]. Entering quarantine is announced on
//! `WatchSettlements` (`FAILED` with the revert) and counted by
//! `x402d_channel_claims_quarantined`; a quarantined channel whose payer
//! started a withdrawal is counted apart, and announced again, since its
//! charges are lost when the delay ends.
//!
//! A claim is idempotent on chain: a row at or below a channel's claimed
//! total changes nothing, and `settle` with nothing claimed pays nothing.
//! So a claim transaction sent again after a crash, or a round that claims
//! a channel another round already claimed, never claims twice. The claim
//! transaction is a write-ahead intent like any settlement, so it is
//! followed, fee-bumped, rebroadcast after a restart and re-sent after a
//! reorg by the same code as `direct` and `batched` settlements.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use alloy::{
    primitives::{Address, B256, Bytes, U256},
    signers::{SignerSync, local::PrivateKeySigner},
};
use x402_chain::{
    Chain,
    channel::{ClaimRow, RefundRow, claim_and_settle_calldata, claim_batch, decode_states, states_calldata},
};
use x402_channel::{ChannelDomain, OnChain, Refund, Voucher};

use super::Settler;
use crate::{
    Result,
    channels::{ClaimOutcome, Claimed, voucher_signer},
    domain::{ChannelRecord, IntentState},
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
    /// How long a channel whose claim reverts is first left out of claims;
    /// doubled at each failure after.
    pub quarantine: Duration,
    /// The longest a quarantined channel waits between two tries.
    pub max_quarantine: Duration,
}

impl ClaimsConfig {
    /// Claims for the channels `authorizer` authorizes on `contract`.
    pub fn new(contract: Address, authorizer: PrivateKeySigner) -> Self {
        Self {
            contract,
            authorizer,
            poll: Duration::from_millis(500),
            max_rows: 200,
            quarantine: Duration::from_secs(30),
            max_quarantine: Duration::from_secs(3600),
        }
    }
}

/// A channel left out of claims because its part of a claim reverts.
#[derive(Clone, Debug)]
struct Quarantined {
    /// Tries that reverted in a row.
    failures: u32,
    /// Not tried again before this.
    until: Instant,
    /// Whether the pending withdrawal it has was announced.
    withdrawal_announced: bool,
}

/// What the claim loop keeps between rounds.
#[derive(Debug, Default)]
struct ClaimsState {
    /// The first block whose events are not read yet (`None`: nothing read).
    next_block: Option<u64>,
    book: Option<Book>,
    quarantine: HashMap<B256, Quarantined>,
    /// Channels sent alone: their claim reverted on chain with others
    /// though the simulation passed.
    solo: HashSet<B256>,
}

/// One channel's share of a claim transaction: its claim row, the refund
/// asked for, or both.
#[derive(Clone, Debug)]
struct Part {
    channel: B256,
    /// Its state as read for this claim.
    onchain: OnChain,
    claim: Option<ClaimRow>,
    refund: Option<RefundRow>,
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
        let mut state = ClaimsState::default();
        let backoff = super::Backoff::default();
        loop {
            let round = self.claims_round(&claims, &mut state).await;
            backoff.record(&round);
            if let Err(err) = round {
                tracing::warn!(%err, "a channel claim round failed; will retry");
            }
            tokio::time::sleep(backoff.end_round(claims.poll)).await;
        }
    }

    /// Reads new contract events, mirrors the channels they name, then
    /// claims the due channels.
    async fn claims_round(&self, claims: &ClaimsConfig, state: &mut ClaimsState) -> Result<ClaimRound> {
        let head = self.chain.block_number().await?;
        let mine = self.book(claims, &mut state.book).await?;
        let touched: Vec<B256> = match state.next_block {
            None => mine
                .values()
                .filter(|r| r.channel.charged > r.channel.onchain.total_claimed)
                .map(|r| r.channel.id)
                .collect(),
            Some(from) if from <= head => {
                let logs = self.chain.channel_logs(claims.contract, from, head).await?;
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
            mine.get_mut(&id).expect("filtered").channel.sync(onchain, self.config.clock.now_secs());
        }
        state.next_block = Some(head + 1);
        self.announce_withdrawals(mine, &mut state.quarantine).await?;

        // A claim still pending (sent before a restart) goes first: the
        // settler's intent round resolves it.
        if self.claim_pending().await? {
            return Ok(ClaimRound::default());
        }
        let now = self.config.clock.now_secs();
        let authorizer = claims.authorizer.address();
        let mut due = Vec::new();
        let instant = Instant::now();
        for record in mine.values() {
            // A quarantined channel waits out its backoff, unless its payer
            // is withdrawing: then it is tried every round, until the end.
            if state.quarantine.get(&record.channel.id).is_some_and(|q| q.until > instant)
                && record.channel.onchain.withdrawal.is_none()
            {
                continue;
            }
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
            // One chunk's failure (the node, a part) holds up no other chunk.
            match self.claim(claims, chunk, &mut state.quarantine, &mut state.solo).await {
                Ok(rows) if rows > 0 => {
                    round.transactions += 1;
                    round.rows += rows;
                }
                Ok(_) => {}
                Err(err) => tracing::warn!(%err, channels = chunk.len(), "claiming a chunk of channels failed"),
            }
        }
        let withdrawing = state
            .quarantine
            .keys()
            .filter(|id| mine.get(*id).is_some_and(|r| r.channel.onchain.withdrawal.is_some()))
            .count();
        metrics::gauge!(crate::metrics::CLAIMS_QUARANTINED).set(state.quarantine.len() as f64);
        metrics::gauge!(crate::metrics::CLAIMS_QUARANTINED_WITHDRAWING).set(withdrawing as f64);
        Ok(round)
    }

    /// Announces each quarantined channel whose payer started a withdrawal
    /// since it entered quarantine: its charges are lost if it is not
    /// claimed before the withdrawal's delay ends.
    async fn announce_withdrawals(&self, mine: &Book, quarantine: &mut HashMap<B256, Quarantined>) -> Result<()> {
        for (id, q) in quarantine.iter_mut().filter(|(_, q)| !q.withdrawal_announced) {
            let Some(record) = mine.get(id) else { continue };
            let Some(withdrawal) = record.channel.onchain.withdrawal else { continue };
            let Some(merchant) = self.engine.merchant(&record.merchant_id) else { continue };
            tracing::error!(
                channel = %id, finalize_after = withdrawal.finalize_after, unclaimed = record.channel.unclaimed(),
                "a quarantined channel's payer started a withdrawal: its charges are lost if it is not claimed in time"
            );
            let reason = format!(
                "channel_claim_quarantined: a withdrawal can be finalized from {} while its claim reverts",
                withdrawal.finalize_after
            );
            let outcome = ClaimOutcome::Quarantined { merchant_number: merchant.number, reason };
            self.engine.sync_channel(*id, record.channel.onchain, Some(outcome)).await?;
            q.withdrawal_announced = true;
        }
        Ok(())
    }

    /// The channels of `claims.contract` as committed: read whole the first
    /// time, then only those the committer reported changed since.
    async fn book<'a>(&self, claims: &ClaimsConfig, book: &'a mut Option<Book>) -> Result<&'a mut Book> {
        let chain_id = self.chain.chain_id();
        let mine = |r: &ChannelRecord| r.chain_id == chain_id && r.contract == claims.contract;
        let changed = self.engine.changed_channels();
        match book {
            Some(channels) => {
                let ids = changed.take(chain_id);
                if !ids.is_empty() {
                    match self.engine.channels_by_id(ids.iter().copied().collect()).await {
                        Ok(records) => channels.extend(records.into_iter().filter(mine).map(|r| (r.channel.id, r))),
                        Err(err) => {
                            changed.add(ids.into_iter().map(|id| (chain_id, id)));
                            return Err(err);
                        }
                    }
                }
            }
            None => {
                // Whatever changed until now is in the whole read.
                changed.take(chain_id);
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
    /// Channels whose part reverts on its own are quarantined and left out.
    async fn claim(
        &self,
        claims: &ClaimsConfig,
        records: &[(ChannelRecord, u32)],
        quarantine: &mut HashMap<B256, Quarantined>,
        solo: &mut HashSet<B256>,
    ) -> Result<usize> {
        let domain = ChannelDomain::new(self.chain.chain_id(), claims.contract);
        let states = self.read_channels(claims.contract, &records.iter().map(|(r, _)| r).collect::<Vec<_>>()).await?;
        let mut parts = Vec::new();
        for ((record, _), onchain) in records.iter().zip(states) {
            let mut channel = record.channel.clone();
            channel.sync(onchain, self.config.clock.now_secs());
            let refund = match record.refund_requested.map(|r| channel.refundable(Some(r))) {
                Some(amount) if amount > 0 => {
                    let nonce = U256::from(channel.onchain.refund_nonce);
                    let digest = domain.refund_digest(&Refund { channelId: channel.id, nonce, amount });
                    let signature = self.authorize(claims, digest)?;
                    Some(RefundRow { config: channel.config.clone(), amount, nonce, signature })
                }
                _ => None,
            };
            let claim = channel.claim_entry().map(|(entry, signature)| {
                // The pipeline checks vouchers of known channels against the
                // signer's key, which does not see `v`; the chain needs it right.
                let digest = domain
                    .voucher_digest(&Voucher { channelId: channel.id, maxClaimableAmount: entry.maxClaimableAmount });
                // A signature that recovers to no one is a contract signer's,
                // proved on chain when accepted: it goes as it is, for the
                // contract to ask the signer (the simulation before sending
                // finds it if the signer has changed its mind).
                let signature = crate::ecdsa::as_claimed(&signature, digest, voucher_signer(&channel.config));
                ClaimRow {
                    config: channel.config.clone(),
                    channel_id: channel.id,
                    max_claimable: entry.maxClaimableAmount,
                    signature,
                    total_claimed: entry.totalClaimed,
                }
            });
            if claim.is_some() || refund.is_some() {
                parts.push(Part { channel: channel.id, onchain: channel.onchain, claim, refund });
            }
        }
        if parts.is_empty() {
            // Nothing to send; a request is served by finding nothing to do.
            self.record_claimed(claims, records, None).await?;
            return Ok(0);
        }
        let (groups, reverting) = self.isolate(claims, &domain, parts, solo).await?;
        for (part, revert) in &reverting {
            let (_, merchant_number) = records.iter().find(|(r, _)| r.channel.id == part.channel).expect("a record's");
            self.quarantine(claims, part, *merchant_number, revert, quarantine).await?;
        }
        // Records with nothing to send are served by finding nothing to do.
        let sending: HashSet<B256> = groups.iter().flatten().map(|p| p.channel).collect();
        let reverting: HashSet<B256> = reverting.into_iter().map(|(p, _)| p.channel).collect();
        let idle: Vec<(ChannelRecord, u32)> = records
            .iter()
            .filter(|(r, _)| !sending.contains(&r.channel.id) && !reverting.contains(&r.channel.id))
            .cloned()
            .collect();
        if !idle.is_empty() {
            self.record_claimed(claims, &idle, None).await?;
        }
        let mut claimed_rows = 0;
        for group in groups {
            let of_group: Vec<(ChannelRecord, u32)> =
                records.iter().filter(|(r, _)| group.iter().any(|p| p.channel == r.channel.id)).cloned().collect();
            match self.send_claim(claims, &domain, &group).await {
                Ok(Some(Ok(block))) => {
                    for p in &group {
                        quarantine.remove(&p.channel);
                        solo.remove(&p.channel);
                    }
                    claimed_rows += group.iter().filter(|p| p.claim.is_some()).count();
                    self.record_claimed(claims, &of_group, Some(block)).await?;
                }
                // Not mined in time: the settler's intent round follows it.
                Ok(None) => self.record_claimed(claims, &of_group, None).await?,
                Ok(Some(Err(tx))) => {
                    // Its simulation passed and it reverted on chain: a part
                    // that behaves differently in a real transaction. Each is
                    // sent alone from now on; one that reverts alone too is
                    // quarantined.
                    match group.as_slice() {
                        [part] if solo.contains(&part.channel) => {
                            let (_, merchant_number) = of_group[0];
                            let revert = format!("its claim transaction {tx} reverted though its simulation passed");
                            self.quarantine(claims, part, merchant_number, &revert, quarantine).await?;
                        }
                        _ => solo.extend(group.iter().map(|p| p.channel)),
                    }
                }
                Err(err) => tracing::warn!(%err, channels = group.len(), "a claim transaction failed; will retry"),
            }
        }
        Ok(claimed_rows)
    }

    /// Sends one claim transaction for `parts` and follows it:
    /// `Some(Ok((tx, block)))` mined and successful, `Some(Err(tx))`
    /// reverted, `None` not mined in time.
    async fn send_claim(
        &self,
        claims: &ClaimsConfig,
        domain: &ChannelDomain,
        parts: &[Part],
    ) -> Result<Option<std::result::Result<(B256, u64), B256>>> {
        let input = self.claim_calldata(claims, domain, parts)?;
        // The cost varies with the rows: estimated for each transaction.
        let gas = self.chain.estimate_gas(claims.contract, input.clone()).await?;
        let tx = self.chain.sign_call(claims.contract, input, Some(gas)).await?;
        let rows = parts.iter().filter(|p| p.claim.is_some()).count();
        let claimed: u128 = parts.iter().filter_map(|p| p.claim.as_ref()).map(|r| r.total_claimed).sum();
        let refunds = parts.iter().filter(|p| p.refund.is_some()).count();
        tracing::info!(tx = %tx.hash, rows, refunds, claimed, "claiming channels");
        metrics::histogram!(crate::metrics::CLAIM_ROWS).record(rows as f64);
        let hash = tx.hash;
        self.claiming.store(true, std::sync::atomic::Ordering::Release);
        let sent = self.send(tx, Vec::new(), Vec::new()).await;
        self.claiming.store(false, std::sync::atomic::Ordering::Release);
        sent?;
        // Concluded (nothing was owed by payments), the channels not yet synced.
        crash_point!("claims::concluded");
        Ok(match self.chain.receipt(hash).await? {
            Some(r) if r.success => Some(Ok((hash, r.block))),
            Some(r) => {
                // Nothing was claimed: no event, the requests stay.
                tracing::error!(tx = %hash, block = r.block, rows, "a claim transaction reverted");
                Some(Err(hash))
            }
            None => None,
        })
    }

    /// Splits `parts` into groups that simulate as one transaction each,
    /// and the parts that revert on their own (with the revert): the set
    /// is simulated whole, then halved until each reverting part stands
    /// alone. `k` reverting parts of `n` cost about `2k·log2(n)`
    /// simulations; none costs one. Parts in `solo` are simulated and sent
    /// alone. Parts that pass in halves but not together go as the halves.
    async fn isolate(
        &self,
        claims: &ClaimsConfig,
        domain: &ChannelDomain,
        parts: Vec<Part>,
        solo: &HashSet<B256>,
    ) -> Result<(Vec<Vec<Part>>, Vec<(Part, String)>)> {
        let (alone, mut parts): (Vec<Part>, Vec<Part>) = parts.into_iter().partition(|p| solo.contains(&p.channel));
        let mut groups = Vec::new();
        let mut reverting = Vec::new();
        for part in alone {
            let input = self.claim_calldata(claims, domain, std::slice::from_ref(&part))?;
            match self.chain.simulate(claims.contract, input).await? {
                None => groups.push(vec![part]),
                Some(revert) => reverting.push((part, revert)),
            }
        }
        // Parts good in halves could still fail together: the good ones are
        // simulated together again until no reverting part is left to take
        // out. Each pass takes one out, so this ends.
        while !parts.is_empty() {
            let mut passed: Vec<Vec<Part>> = Vec::new();
            let mut found = Vec::new();
            let mut sets = vec![parts];
            while let Some(mut set) = sets.pop() {
                let input = self.claim_calldata(claims, domain, &set)?;
                match self.chain.simulate(claims.contract, input).await? {
                    None => passed.push(set),
                    Some(revert) if set.len() == 1 => found.push((set.remove(0), revert)),
                    Some(_) => {
                        let second = set.split_off(set.len() / 2);
                        sets.push(second);
                        sets.push(set);
                    }
                }
            }
            if found.is_empty() {
                // Nothing reverts alone: the set passed whole, or its
                // halves pass apart only and go as such.
                groups.append(&mut passed);
                break;
            }
            reverting.append(&mut found);
            parts = passed.into_iter().flatten().collect();
        }
        Ok((groups, reverting))
    }

    /// Leaves `part`'s channel out of claims for a while after it reverted
    /// with `revert`, announcing it the first time.
    async fn quarantine(
        &self,
        claims: &ClaimsConfig,
        part: &Part,
        merchant_number: u32,
        revert: &str,
        quarantine: &mut HashMap<B256, Quarantined>,
    ) -> Result<()> {
        let id = part.channel;
        let entry = quarantine.entry(id).or_insert(Quarantined {
            failures: 0,
            until: Instant::now(),
            withdrawal_announced: false,
        });
        entry.failures += 1;
        let backoff = claims.quarantine.saturating_mul(1 << (entry.failures - 1).min(16)).min(claims.max_quarantine);
        entry.until = Instant::now() + backoff;
        tracing::warn!(
            channel = %id, failures = entry.failures, retry_in = ?backoff, %revert,
            "a channel's claim reverts on its own: quarantined, the other channels are claimed"
        );
        if entry.failures == 1 {
            entry.withdrawal_announced = part.onchain.withdrawal.is_some();
            let reason = format!("channel_claim_quarantined: the claim reverts: {revert}");
            let outcome = ClaimOutcome::Quarantined { merchant_number, reason };
            self.engine.sync_channel(id, part.onchain, Some(outcome)).await?;
        }
        Ok(())
    }

    /// The calldata of one transaction making `parts`: their claims under
    /// one batch signature, a settle per receiver claimed for, and their
    /// refunds.
    fn claim_calldata(&self, claims: &ClaimsConfig, domain: &ChannelDomain, parts: &[Part]) -> Result<Bytes> {
        let rows: Vec<ClaimRow> = parts.iter().filter_map(|p| p.claim.clone()).collect();
        let refunds: Vec<RefundRow> = parts.iter().filter_map(|p| p.refund.clone()).collect();
        let mut settle = Vec::new();
        for row in &rows {
            let receiver = (row.config.receiver, row.config.token);
            if !settle.contains(&receiver) {
                settle.push(receiver);
            }
        }
        let signature = if rows.is_empty() {
            Vec::new()
        } else {
            self.authorize(claims, domain.claim_batch_digest(&claim_batch(&rows)))?.to_vec()
        };
        Ok(claim_and_settle_calldata(&rows, &signature, &settle, &refunds))
    }

    /// Mirrors the channels a claim round served, with the transaction (if
    /// one was mined) as their event.
    async fn record_claimed(
        &self,
        claims: &ClaimsConfig,
        records: &[(ChannelRecord, u32)],
        mined: Option<(B256, u64)>,
    ) -> Result<()> {
        let at = self.config.clock.now_secs();
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
                Some(ClaimOutcome::Claimed(claimed))
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
        Ok(claims.authorizer.sign_hash_sync(&digest).map_err(|e| crate::Error::Signing(e.to_string()))?.as_bytes())
    }

    /// The on-chain state of each of `records`, in order: one `eth_call`
    /// per [`READ_CHUNK`] channels.
    async fn read_channels(&self, contract: Address, records: &[&ChannelRecord]) -> Result<Vec<OnChain>> {
        let mut states = Vec::with_capacity(records.len());
        for chunk in records.chunks(READ_CHUNK) {
            let ids: Vec<B256> = chunk.iter().map(|r| r.channel.id).collect();
            let delays: Vec<u64> = chunk.iter().map(|r| r.channel.config.withdrawDelay.to::<u64>()).collect();
            let out = self.chain.call(contract, states_calldata(&ids)).await?;
            states.extend(decode_states(&out, &delays)?);
        }
        Ok(states)
    }
}
