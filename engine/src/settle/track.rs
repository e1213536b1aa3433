//! Following settlement transactions from signature to finality, whatever
//! strategy made them: write-ahead intents, broadcast, fee bumps, receipts,
//! per-payment outcomes, crash recovery and reorgs.

use std::time::Instant;

use alloy::primitives::B256;
use x402_chain::{Chain, Receipt, SignedTx};

use super::{SIMULATION_FAILED, Settler, classify_revert};
use crate::{
    Error, Result,
    domain::{IntentState, PaymentId, PaymentState, TxIntent},
    pipeline::{IntentChange, Transition},
    reason::Reason,
};

impl TxIntent {
    /// A freshly signed transaction settling `payments`, signed at `now` (Unix ms).
    fn pending(chain_id: u64, tx: &SignedTx, payments: Vec<PaymentId>, now: u64) -> Self {
        Self {
            chain_id,
            signer: tx.signer,
            nonce: tx.nonce,
            tx_hashes: vec![tx.hash],
            raw: tx.raw.to_vec(),
            payments,
            state: IntentState::Pending,
            created_at_ms: now,
            updated_at_ms: now,
        }
    }
}

impl<C: Chain> Settler<C> {
    /// Every payment of an intent back to (or still) `Submitted` with `tx`.
    fn submitted(&self, payments: &[PaymentId], tx: B256) -> Vec<Transition> {
        let status = self.status_with_tx(PaymentState::Submitted, tx, None);
        payments.iter().map(|id| Transition { id: *id, status: status.clone() }).collect()
    }

    /// Records `tx` as a pending intent for `payments` together with
    /// `transitions` (write-ahead), broadcasts it and follows it. A nonce
    /// the node has seen used (another sender of the same key) is replaced
    /// by a fresh signature under the next nonce, recorded again first.
    pub(super) async fn send(
        &self,
        tx: SignedTx,
        payments: Vec<PaymentId>,
        transitions: Vec<Transition>,
    ) -> Result<()> {
        crash_point!("settle::signed");
        let chain_id = self.chain.chain_id();
        let mut tx = tx;
        let mut intent = TxIntent::pending(chain_id, &tx, payments, self.now_ms());
        let mut changes = vec![IntentChange::Record(intent.clone())];
        let mut transitions = transitions;
        loop {
            if let Err(err) = self.record(changes, transitions).await {
                // Not recorded, so never to be sent: its nonce must not stay
                // a gap that holds up every later transaction of the signer.
                // (Unless a recorded intent holds that nonce: it is no gap.)
                if !matches!(err, Error::IntentConflict(_))
                    && let Err(fill) = self.chain.fill_nonce(&tx).await
                {
                    tracing::warn!(signer = %tx.signer, nonce = tx.nonce, err = %fill, "could not fill an unsent nonce");
                }
                return Err(err);
            }
            crash_point!("settle::recorded");
            match self.chain.broadcast(&tx).await {
                Ok(()) => break,
                Err(x402_chain::Error::NonceTooLow { .. }) => {
                    let fresh = self.chain.sign_call(tx.to, tx.input.clone(), Some(tx.gas_limit)).await?;
                    let stale = intent.key();
                    intent = TxIntent::pending(chain_id, &fresh, intent.payments, self.now_ms());
                    changes = vec![IntentChange::Forget(stale), IntentChange::Record(intent.clone())];
                    transitions = self.submitted(&intent.payments, fresh.hash);
                    tx = fresh;
                }
                // Recorded but perhaps not sent: the next round resolves it.
                Err(err) => return Err(err.into()),
            }
        }
        crash_point!("settle::broadcast");
        self.follow(intent, tx).await
    }

    /// Waits for a receipt of any version of `tx`, replacing it with a fee
    /// bump each time it waited [`SettlerConfig::stuck_after`] unmined.
    /// Leaves the intent `Pending` after [`SettlerConfig::receipt_timeout`].
    ///
    /// [`SettlerConfig::stuck_after`]: super::SettlerConfig::stuck_after
    /// [`SettlerConfig::receipt_timeout`]: super::SettlerConfig::receipt_timeout
    async fn follow(&self, intent: TxIntent, tx: SignedTx) -> Result<()> {
        let started = Instant::now();
        let (mut intent, mut tx) = (intent, tx);
        loop {
            let left = self.config.receipt_timeout.saturating_sub(started.elapsed());
            let wait = self.config.stuck_after.min(left);
            if let Some(receipt) = self.chain.wait_receipt(&intent.tx_hashes, wait).await? {
                return self.conclude(&intent, &receipt).await;
            }
            if started.elapsed() >= self.config.receipt_timeout {
                tracing::warn!(tx = %tx.hash, "no receipt in time; the intent stays pending");
                return Ok(());
            }
            let bumps = intent.tx_hashes.len().saturating_sub(1);
            if bumps >= self.config.max_bumps as usize
                || x402_chain::any_included(&*self.chain, &intent.tx_hashes).await?
            {
                continue;
            }
            // Stuck: replace it at the same nonce with higher fees, recorded first.
            let bumped = self.chain.bump(&tx).await?;
            intent.tx_hashes.push(bumped.hash);
            intent.raw = bumped.raw.to_vec();
            intent.updated_at_ms = self.now_ms();
            let transitions = self.submitted(&intent.payments, bumped.hash);
            self.record(vec![IntentChange::Record(intent.clone())], transitions).await?;
            metrics::counter!(crate::metrics::FEE_BUMPS).increment(1);
            tracing::info!(
                stuck = %tx.hash, replacement = %bumped.hash, max_fee = bumped.max_fee_per_gas,
                "replaced a stuck settlement transaction"
            );
            match self.chain.broadcast(&bumped).await {
                // NonceTooLow: an earlier version was mined meanwhile.
                Ok(()) | Err(x402_chain::Error::NonceTooLow { .. }) => {}
                Err(err) => tracing::warn!(%err, "the replacement was not accepted; will bump again"),
            }
            tx = bumped;
        }
    }

    /// Records what a receipt says about each payment of `intent`:
    /// `Confirmed` when the receipt carries the token's
    /// `AuthorizationUsed(from, nonce)` for it (the settlement's proof,
    /// unambiguous where `Transfer` logs are not). Otherwise a fresh
    /// simulation of the payment alone decides: `Failed` with its reason,
    /// or, for a batch row that would now succeed (it failed for a passing
    /// reason, such as running out of gas), back to the queue for a later
    /// batch.
    async fn conclude(&self, intent: &TxIntent, receipt: &Receipt) -> Result<()> {
        crash_point!("settle::mined");
        let mut transitions = Vec::with_capacity(intent.payments.len());
        let now_ms = self.now_ms();
        let mut confirmed = 0u64;
        let mut strategy = "direct";
        // A transaction that ran out of gas failed on its own account, not
        // its payments'.
        let out_of_gas = !receipt.success
            && SignedTx::from_raw(intent.raw.clone().into(), intent.signer)
                .is_ok_and(|tx| receipt.gas_used.saturating_mul(100) >= tx.gas_limit.saturating_mul(98));
        for id in &intent.payments {
            let Some(p) = self.engine.payment(*id).await? else { continue };
            let a = &p.authorization;
            strategy = p.policy.name();
            let status = if receipt.success && receipt.used(p.asset, a.from, a.nonce) {
                confirmed += 1;
                let seconds = now_ms.saturating_sub(p.accepted_at_ms) as f64 / 1000.0;
                metrics::histogram!(crate::metrics::ACCEPT_TO_CONFIRM_SECONDS, "strategy" => strategy).record(seconds);
                self.status_with_tx(PaymentState::Confirmed, receipt.tx, Some(receipt.block))
            } else if p.status.state == PaymentState::Confirmed && p.status.transaction != Some(receipt.tx) {
                // Settled by another transaction: this one cannot undo it.
                continue;
            } else {
                let revert = self.simulate_payment(&p).await?;
                match revert {
                    // It failed for a passing reason and would pass now:
                    // queued again, until its deadline. A batch row is; a
                    // direct payment only when its transaction ran out of
                    // gas (else a payer who moves its balance away and back
                    // around each attempt would have x402d pay for reverted
                    // transactions without end).
                    // A payer with code decides what its check costs: one that
                    // ran its own transaction out of gas (perhaps only when
                    // the gas is paid for) is sent again at most
                    // `OUT_OF_GAS_RETRIES` times (an estimate may have drifted),
                    // then fails.
                    None if p.signature_kind == crate::domain::SignatureKind::Ecdsa
                        && !self.alone.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(id)
                        && (out_of_gas || !matches!(p.policy, crate::domain::SettlementPolicy::Direct)) =>
                    {
                        self.status(PaymentState::Queued)
                    }
                    None if out_of_gas && self.retry_out_of_gas(*id) => self.status(PaymentState::Queued),
                    Some(r) if classify_revert(&r) == Reason::ValidAfter.code() => self.status(PaymentState::Queued),
                    revert => {
                        // Spent, not by this transaction: the chain may say how.
                        let spent = match revert.as_deref() {
                            Some(r) if classify_revert(r) == Reason::NonceAlreadyUsed.code() => {
                                self.spent_elsewhere(&p).await?
                            }
                            _ => None,
                        };
                        if let Some(spent) = spent {
                            transitions.push(Transition { id: *id, status: spent });
                            continue;
                        }
                        let mut failed = self.status_with_tx(PaymentState::Failed, receipt.tx, Some(receipt.block));
                        failed.failure_reason =
                            Some(revert.as_deref().map_or(SIMULATION_FAILED, classify_revert).into());
                        failed
                    }
                }
            };
            transitions.push(Transition { id: *id, status });
        }
        if confirmed > 0 {
            let gas = receipt.gas_used as f64 / confirmed as f64;
            metrics::histogram!(crate::metrics::GAS_PER_PAYMENT, "strategy" => strategy).record(gas);
        }
        let change = if self.config.finality_depth == 0 {
            IntentChange::Forget(intent.key())
        } else {
            let mut included = intent.clone();
            included.state = IntentState::Included {
                tx: receipt.tx,
                block: receipt.block,
                block_hash: receipt.block_hash,
                success: receipt.success,
            };
            included.updated_at_ms = self.now_ms();
            IntentChange::Record(included)
        };
        self.record(vec![change], transitions).await
    }

    /// Settles an intent left `Pending`: a receipt for any of its versions
    /// concludes it; otherwise the latest signed bytes are sent again and
    /// followed. If its nonce went to another transaction it is abandoned.
    pub(super) async fn resolve(&self, intent: TxIntent) -> Result<()> {
        let tx = SignedTx::from_raw(intent.raw.clone().into(), intent.signer)?;
        let now = std::time::Duration::ZERO;
        if let Some(receipt) = self.chain.wait_receipt(&intent.tx_hashes, now).await? {
            return self.conclude(&intent, &receipt).await;
        }
        match self.chain.broadcast(&tx).await {
            Ok(()) => tracing::info!(tx = %tx.hash, "rebroadcast a pending settlement transaction"),
            Err(x402_chain::Error::NonceTooLow { .. })
                if !x402_chain::any_included(&*self.chain, &intent.tx_hashes).await? =>
            {
                return self.abandon(intent).await;
            }
            Err(x402_chain::Error::NonceTooLow { .. }) => {}
            // Refused (its fees are below today's base fee, say) or not
            // sent: followed all the same, so that it is replaced by a fee
            // bump once it has waited `stuck_after`, rather than left
            // pending, holding up every later nonce of its signer.
            Err(err) => {
                tracing::warn!(%err, tx = %tx.hash, "a pending settlement transaction was not taken; following it")
            }
        }
        self.follow(intent, tx).await
    }

    /// Gives up an intent whose nonce another transaction took: it can
    /// never be mined. Each payment whose authorization the token shows
    /// spent is concluded by how it was spent ([`Settler::spent_elsewhere`]:
    /// confirmed only if its payee got the transfer); the others are
    /// queued again.
    async fn abandon(&self, intent: TxIntent) -> Result<()> {
        let mut transitions = Vec::with_capacity(intent.payments.len());
        for id in &intent.payments {
            let Some(p) = self.engine.payment(*id).await? else { continue };
            let a = &p.authorization;
            let used = self.chain.authorization_state(p.asset, a.from, a.nonce).await?;
            let status = match used {
                true => self.spent_elsewhere(&p).await?.unwrap_or_else(|| {
                    let mut failed = self.status(PaymentState::Failed);
                    failed.failure_reason = Some(Reason::NonceAlreadyUsed.code().into());
                    failed
                }),
                false => self.status(PaymentState::Queued),
            };
            transitions.push(Transition { id: *id, status });
        }
        tracing::warn!(signer = %intent.signer, nonce = intent.nonce, "a settlement transaction's nonce was taken; abandoned");
        self.record(vec![IntentChange::Forget(intent.key())], transitions).await
    }

    /// An included intent whose block left the canonical chain: concluded
    /// again from its new receipt if it was mined again deep enough, else
    /// back to `Pending` (its payments `Submitted`, owed again) so the next
    /// round rebroadcasts its signed bytes.
    pub(super) async fn reorged(&self, intent: TxIntent) -> Result<()> {
        metrics::counter!(crate::metrics::REORGS).increment(1);
        for hash in intent.tx_hashes.iter().rev() {
            if let Some(receipt) = self.chain.receipt(*hash).await?
                && receipt.confirmations >= self.chain.confirmations()
            {
                tracing::warn!(tx = %hash, block = receipt.block, "a reorg moved a settlement transaction");
                return self.conclude(&intent, &receipt).await;
            }
        }
        let latest = intent.tx_hashes.last().copied().unwrap_or_default();
        tracing::warn!(tx = %latest, "a reorg dropped a settlement transaction; it will be sent again");
        let mut pending = intent;
        pending.state = IntentState::Pending;
        pending.updated_at_ms = self.now_ms();
        let transitions = self.submitted(&pending.payments, latest);
        self.record(vec![IntentChange::Record(pending)], transitions).await
    }
}

#[cfg(test)]
mod tests;
