//! The `batched` strategy: many `transferWithAuthorization` rows in one
//! Multicall3 `aggregate3` transaction, each row allowed to fail alone.
//!
//! Queued payments form one batch per token (the settler is per chain). A
//! batch is sent when it has `max_rows` rows (the smallest among its
//! merchants' policies, and no more than fit under half a block's gas),
//! when its oldest row has waited `max_wait_ms`, or when its earliest
//! `validBefore` comes within [`SettlerConfig::batch_deadline_margin_secs`],
//! whichever comes first.
//!
//! Before sending, rows past their deadline end `Expired`, a payer's rows
//! must together fit its balance (read for all payers in one `aggregate3`
//! call), and the exact batch is simulated; rows that would fail are taken
//! out and end `Failed` with the token's reason. After the receipt, a row
//! is `Confirmed` only if the receipt carries its `AuthorizationUsed` log.
//!
//! [`SettlerConfig::batch_deadline_margin_secs`]: super::SettlerConfig::batch_deadline_margin_secs

use std::collections::{HashMap, HashSet};

use alloy::primitives::{Address, U256};
use x402_chain::{
    Chain,
    batch::{aggregate3_calldata, balance_of_rows, decode_aggregate3, decode_balances},
};

use super::{Settler, classify_revert, settlement_rows};
use crate::{
    Result,
    domain::{PaymentRecord, PaymentState, SettlementPolicy},
    pipeline::Transition,
    reason::Reason,
};

/// Simulation passes before a batch is sent: each takes out the rows that
/// failed the one before.
const SIMULATION_PASSES: usize = 3;

/// Gas a row is assumed to take before a batch has been estimated.
pub(super) const INITIAL_ROW_GAS: u64 = 60_000;

impl<C: Chain> Settler<C> {
    /// How many of `rows` (one token's queued batched payments, earliest
    /// deadline first) to send now, if any.
    pub(super) fn batch_due(&self, rows: &[PaymentRecord], now_ms: u64, gas_cap_rows: usize) -> Option<usize> {
        let policies = rows.iter().filter_map(|r| match r.policy {
            SettlementPolicy::Batched { max_rows, max_wait_ms } => Some((max_rows as usize, max_wait_ms)),
            _ => None,
        });
        let (max_rows, max_wait_ms) =
            policies.fold((usize::MAX, u64::MAX), |(rows, wait), (r, w)| (rows.min(r), wait.min(w)));
        let cap = max_rows.min(gas_cap_rows).max(1);
        if rows.len() >= cap {
            return Some(cap);
        }
        let oldest = rows.iter().map(|r| r.accepted_at_ms).min()?;
        let earliest = rows.iter().map(|r| r.authorization.valid_before_secs()).min()?;
        let waited = now_ms.saturating_sub(oldest) >= max_wait_ms;
        let deadline_near = earliest <= now_ms / 1000 + self.config.batch_deadline_margin_secs;
        (waited || deadline_near).then_some(rows.len())
    }

    /// Settles `rows` (one token's) in one `aggregate3` transaction.
    pub(super) async fn settle_batch(&self, token: Address, rows: Vec<PaymentRecord>) -> Result<()> {
        let mut transitions = Vec::new();
        let fail = |transitions: &mut Vec<Transition>, row: &PaymentRecord, reason: &str| {
            let mut failed = self.status(PaymentState::Failed);
            failed.failure_reason = Some(reason.into());
            transitions.push(Transition { id: row.id, status: failed });
        };

        // Deadlines, and one row per (from, nonce).
        let (mut seen, mut chain_time) = (HashSet::new(), None);
        let mut live = Vec::with_capacity(rows.len());
        for row in rows {
            let a = &row.authorization;
            if self.expired(a.valid_before_secs(), self.config.expiry_margin_secs, &mut chain_time).await? {
                let mut expired = self.status(PaymentState::Expired);
                expired.failure_reason = Some(Reason::ValidBefore.code().into());
                transitions.push(Transition { id: row.id, status: expired });
            } else if seen.insert((a.from, a.nonce)) {
                live.push(row);
            }
        }

        // Each payer's rows must together fit its balance, earliest deadline first.
        let payers: Vec<Address> =
            live.iter().map(|r| r.authorization.from).collect::<HashSet<_>>().into_iter().collect();

        if !payers.is_empty() {
            let read = aggregate3_calldata(balance_of_rows(token, &payers));
            let output = self.chain.call(self.config.multicall, read).await?;
            let balances = decode_balances(&decode_aggregate3(&output)?);
            let mut left: HashMap<Address, U256> = payers.into_iter().zip(balances).collect();
            live.retain(|row| {
                let a = &row.authorization;
                let balance = left.entry(a.from).or_default();
                if *balance >= a.value {
                    *balance -= a.value;
                    true
                } else {
                    fail(&mut transitions, row, Reason::InsufficientBalance.code());
                    false
                }
            });
        }

        // The exact batch is simulated; rows that would fail come out.
        for _ in 0..SIMULATION_PASSES {
            if live.is_empty() {
                break;
            }
            let (rows, transfers) = batch_rows(&live);
            let output = self.chain.call(self.config.multicall, aggregate3_calldata(rows)).await?;
            let results = decode_aggregate3(&output)?;
            let results: Vec<_> = transfers.iter().map(|&i| results.get(i).cloned().unwrap_or_default()).collect();
            if results.iter().all(|r| r.success) {
                break;
            }
            let mut kept = Vec::with_capacity(live.len());
            for (row, result) in live.into_iter().zip(results) {
                if result.success {
                    kept.push(row);
                } else {
                    // No reason at all: out of gas, perhaps starved by a row
                    // before it. Alone it tells.
                    let message = match result.revert_message() {
                        Some(message) => Some(message),
                        None => self.simulate_payment(&row).await?,
                    };
                    let Some(message) = message else {
                        kept.push(row);
                        continue;
                    };
                    let reason = classify_revert(&message);
                    let spent = if reason == Reason::NonceAlreadyUsed.code() {
                        self.spent_elsewhere(&row).await?
                    } else {
                        None
                    };
                    if let Some(status) = spent {
                        // Spent already, and the chain says by whom and to whom.
                        transitions.push(Transition { id: row.id, status });
                    } else if reason != Reason::ValidAfter.code() {
                        // (Not valid yet on chain: left queued for a later batch.)
                        fail(&mut transitions, &row, reason);
                    }
                }
            }
            live = kept;
        }
        if live.is_empty() {
            return self.record(Vec::new(), transitions).await;
        }

        let calldata = aggregate3_calldata(batch_rows(&live).0);
        let gas = self.chain.estimate_gas(self.config.multicall, calldata.clone()).await?;
        self.row_gas.store(gas / live.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let tx = self.chain.sign_call(self.config.multicall, calldata, Some(gas)).await?;
        metrics::histogram!(crate::metrics::BATCH_ROWS).record(live.len() as f64);
        tracing::info!(tx = %tx.hash, rows = live.len(), %token, gas, "sending a settlement batch");
        transitions.extend(
            live.iter()
                .map(|r| Transition { id: r.id, status: self.status_with_tx(PaymentState::Submitted, tx.hash, None) }),
        );
        self.send(tx, live.iter().map(|r| r.id).collect(), transitions).await
    }
}

impl<C: Chain> Settler<C> {
    /// Which of `payers` hold code now: one probe call, or, on a node that
    /// refuses the probe's overrides, `eth_getCode` each (none, on a chain
    /// that can do neither).
    pub(super) async fn payers_with_code(&self, payers: &[Address]) -> Result<HashSet<Address>> {
        if payers.is_empty() {
            return Ok(HashSet::new());
        }
        let now = self.now_ms() / 1000;
        let sizes = match self.chain.probe(x402_chain::signature::code_sizes_calldata(payers), now).await {
            Ok(output) => x402_chain::signature::decode_code_sizes(&output)?,
            Err(x402_chain::Error::Config(_)) => return Ok(HashSet::new()),
            Err(e) if !e.is_error_answer() => return Err(e.into()),
            Err(e) => {
                tracing::debug!(error = %e, "the node refused the code probe; reading each payer's code");
                let reads = futures::future::join_all(payers.iter().map(|p| self.chain.has_code(*p))).await;
                reads.into_iter().collect::<x402_chain::Result<Vec<bool>>>()?
            }
        };
        Ok(payers.iter().zip(sizes).filter(|(_, code)| *code).map(|(p, _)| *p).collect())
    }
}

/// The `aggregate3` rows settling `payments` in order, and the index of
/// each payment's transfer row among them (a counterfactual wallet's
/// factory row comes just before its transfer).
fn batch_rows(payments: &[PaymentRecord]) -> (Vec<(Address, alloy::primitives::Bytes)>, Vec<usize>) {
    let mut rows = Vec::with_capacity(payments.len());
    let mut transfers = Vec::with_capacity(payments.len());
    for p in payments {
        rows.extend(settlement_rows(p));
        transfers.push(rows.len() - 1);
    }
    (rows, transfers)
}
