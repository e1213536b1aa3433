//! The `direct` strategy: one `transferWithAuthorization` transaction per
//! payment.

use std::{collections::HashSet, sync::Arc, time::Duration};

use alloy::{primitives::Bytes, rpc::types::TransactionReceipt, sol_types::SolEvent};
use tokio::task::JoinSet;
use x402_chain::{
    AlloyChain, SignedTx,
    eip3009::{IEip3009, transfer_with_authorization_calldata},
};

use super::{SIMULATION_FAILED, classify_revert};
use crate::{
    Engine, Error, Result,
    domain::{
        IntentState, PaymentId, PaymentRecord, PaymentState, PaymentStatus, SettlementPolicy, TxIntent, unix_millis,
    },
    pipeline::Transition,
};

/// How the direct settler paces itself.
#[derive(Clone, Debug)]
pub struct SettlerConfig {
    /// How often the settlement queue is looked at.
    pub poll: Duration,
    /// Payments being settled at once.
    pub max_in_flight: usize,
    /// How long to wait for a receipt before leaving a payment `Submitted`.
    pub receipt_timeout: Duration,
    /// A payment with less validity left than this is not sent: `Expired`.
    pub expiry_margin_secs: u64,
}

impl Default for SettlerConfig {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(100),
            max_in_flight: 64,
            receipt_timeout: Duration::from_secs(60),
            expiry_margin_secs: 3,
        }
    }
}

/// Settles the queued payments of `direct` merchants on one chain.
#[derive(Debug)]
pub struct DirectSettler {
    engine: Arc<Engine>,
    chain: Arc<AlloyChain>,
    config: SettlerConfig,
}

impl DirectSettler {
    /// Starts settling in the background until the handle is aborted.
    pub fn spawn(engine: Arc<Engine>, chain: Arc<AlloyChain>, config: SettlerConfig) -> tokio::task::JoinHandle<()> {
        let settler = Arc::new(Self { engine, chain, config });
        tokio::spawn(settler.run())
    }

    async fn run(self: Arc<Self>) {
        let mut tasks = JoinSet::new();
        let mut in_flight = HashSet::new();
        // Payments this settler does not handle (other strategy or chain).
        let mut not_mine = HashSet::new();
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Ok(ids) = done {
                    for id in ids {
                        in_flight.remove(&id);
                    }
                }
            }
            // Transactions signed earlier (before a crash, or whose receipt
            // did not come in time) are resolved before anything new is sent.
            match self.engine.intents().await {
                Ok(intents) => {
                    for intent in intents {
                        if intent.state != IntentState::Pending
                            || intent.chain_id != self.chain.chain_id()
                            || intent.payments.iter().any(|id| in_flight.contains(id))
                        {
                            continue;
                        }
                        in_flight.extend(intent.payments.iter().copied());
                        let this = self.clone();
                        tasks.spawn(async move {
                            let ids = intent.payments.clone();
                            if let Err(err) = this.resolve(intent).await {
                                tracing::warn!(%err, "resolving a transaction intent failed; will retry");
                            }
                            ids
                        });
                    }
                }
                Err(err) => tracing::warn!(%err, "reading transaction intents failed"),
            }
            match self.engine.settlement_queue().await {
                Ok(mut queue) => {
                    queue.sort_by_key(|k| (k.deadline, k.id));
                    not_mine.retain(|id| queue.iter().any(|k| k.id == *id));
                    for key in queue {
                        if in_flight.len() >= self.config.max_in_flight {
                            break;
                        }
                        if in_flight.contains(&key.id) || not_mine.contains(&key.id) {
                            continue;
                        }
                        let record = match self.engine.payment(key.id).await {
                            Ok(Some(record)) => record,
                            Ok(None) => continue,
                            Err(err) => {
                                tracing::warn!(%err, "reading a queued payment failed");
                                break;
                            }
                        };
                        if record.policy != SettlementPolicy::Direct || record.chain_id != self.chain.chain_id() {
                            not_mine.insert(key.id);
                            continue;
                        }
                        if record.status.state != PaymentState::Queued {
                            // Submitted: its intent is resolved above.
                            continue;
                        }
                        in_flight.insert(key.id);
                        let this = self.clone();
                        tasks.spawn(async move {
                            let id = record.id;
                            if let Err(err) = this.settle(record).await {
                                tracing::warn!(%err, payment = %id, "settlement attempt failed; will retry");
                            }
                            vec![id]
                        });
                    }
                }
                Err(err) => tracing::warn!(%err, "reading the settlement queue failed"),
            }
            tokio::time::sleep(self.config.poll).await;
        }
    }

    async fn record(&self, intents: Vec<TxIntent>, id: PaymentId, status: PaymentStatus) -> Result<()> {
        self.engine.record_settlement(intents, vec![Transition { id, status }]).await
    }

    /// Takes one payment from `Queued` to `Confirmed`, `Failed` or `Expired`.
    async fn settle(&self, payment: PaymentRecord) -> Result<()> {
        let now_ms = unix_millis();
        let status = |state| PaymentStatus::new(state, unix_millis());
        let a = &payment.authorization;
        if a.valid_before_secs() <= now_ms / 1000 + self.config.expiry_margin_secs {
            let mut expired = status(PaymentState::Expired);
            expired.failure_reason = Some(crate::Reason::ValidBefore.code().into());
            return self.record(Vec::new(), payment.id, expired).await;
        }
        let calldata = transfer_call(&payment);
        if let Some(revert) = self.chain.simulate(payment.asset, calldata.clone()).await.map_err(chain_error)? {
            let mut failed = status(PaymentState::Failed);
            failed.failure_reason = Some(classify_revert(&revert).into());
            return self.record(Vec::new(), payment.id, failed).await;
        }

        // Write ahead: the intent and `Submitted` are durable before the broadcast.
        let mut tx = self.chain.sign_call(payment.asset, calldata.clone()).await.map_err(chain_error)?;
        self.record(vec![intent(&tx, &payment, IntentState::Pending)], payment.id, submitted(&tx)).await?;
        loop {
            match self.chain.broadcast(&tx).await {
                Ok(()) => break,
                Err(x402_chain::Error::NonceTooLow { .. }) => {
                    tx = self.chain.sign_call(payment.asset, calldata.clone()).await.map_err(chain_error)?;
                    self.record(vec![intent(&tx, &payment, IntentState::Pending)], payment.id, submitted(&tx)).await?;
                }
                Err(err) => return Err(chain_error(err)),
            }
        }

        let Some(receipt) = self.chain.wait_receipt(tx.hash, self.config.receipt_timeout).await.map_err(chain_error)?
        else {
            tracing::warn!(payment = %payment.id, tx = %tx.hash, "no receipt in time; the payment stays submitted");
            return Ok(());
        };
        self.conclude(&payment, &tx, &receipt).await
    }

    /// Records what a receipt says about `payment`.
    async fn conclude(&self, payment: &PaymentRecord, tx: &SignedTx, receipt: &TransactionReceipt) -> Result<()> {
        let status = |state| PaymentStatus::new(state, unix_millis());
        let block = receipt.block_number.unwrap_or_default();
        let settled = receipt.status() && authorization_used(receipt, payment);
        let included = IntentState::Included { tx: tx.hash, block, success: receipt.status() };
        let mut outcome = status(if settled { PaymentState::Confirmed } else { PaymentState::Failed });
        outcome.transaction = Some(tx.hash);
        outcome.block = Some(block);
        if !settled {
            let revert = self.chain.simulate(payment.asset, transfer_call(payment)).await.map_err(chain_error)?;
            outcome.failure_reason = Some(revert.as_deref().map_or(SIMULATION_FAILED, classify_revert).into());
        }
        self.record(vec![intent(tx, payment, included)], payment.id, outcome).await
    }

    /// Settles an intent left `Pending`: a receipt for any of its versions
    /// concludes it; otherwise the signed bytes are sent again. If its nonce
    /// went to another transaction, the payments go back to the queue, unless
    /// the token shows them settled.
    async fn resolve(&self, pending: TxIntent) -> Result<()> {
        let Some(&latest) = pending.tx_hashes.last() else { return Ok(()) };
        let tx = SignedTx {
            hash: latest,
            raw: pending.raw.clone().into(),
            signer: pending.signer,
            nonce: pending.nonce,
            to: alloy::primitives::Address::ZERO,
            gas_limit: 0,
            max_fee_per_gas: 0,
            max_priority_fee_per_gas: 0,
        };
        let mut payments = Vec::with_capacity(pending.payments.len());
        for id in &pending.payments {
            payments.extend(self.engine.payment(*id).await?);
        }
        for hash in pending.tx_hashes.iter().rev() {
            if let Some(receipt) = self.chain.receipt(*hash).await.map_err(chain_error)? {
                let mined = SignedTx { hash: *hash, ..tx.clone() };
                for payment in &payments {
                    self.conclude(payment, &mined, &receipt).await?;
                }
                return Ok(());
            }
        }
        match self.chain.broadcast(&tx).await {
            Ok(()) => {
                tracing::info!(tx = %tx.hash, "rebroadcast a pending settlement transaction");
                if let Some(receipt) =
                    self.chain.wait_receipt(tx.hash, self.config.receipt_timeout).await.map_err(chain_error)?
                {
                    for payment in &payments {
                        self.conclude(payment, &tx, &receipt).await?;
                    }
                }
                Ok(())
            }
            Err(x402_chain::Error::NonceTooLow { .. }) => {
                // The nonce was used by another transaction: this one can never be mined.
                let mut abandoned = pending.clone();
                abandoned.state = IntentState::Abandoned;
                abandoned.updated_at_ms = unix_millis();
                let mut transitions = Vec::new();
                for p in &payments {
                    let a = &p.authorization;
                    let used = self.chain.authorization_state(p.asset, a.from, a.nonce).await.map_err(chain_error)?;
                    let state = if used { PaymentState::Confirmed } else { PaymentState::Queued };
                    transitions.push(Transition { id: p.id, status: PaymentStatus::new(state, unix_millis()) });
                }
                self.engine.record_settlement(vec![abandoned], transitions).await
            }
            Err(err) => Err(chain_error(err)),
        }
    }
}

fn chain_error(err: x402_chain::Error) -> Error {
    Error::Chain(Box::new(err))
}

fn submitted(tx: &SignedTx) -> PaymentStatus {
    let mut status = PaymentStatus::new(PaymentState::Submitted, unix_millis());
    status.transaction = Some(tx.hash);
    status
}

fn intent(tx: &SignedTx, payment: &PaymentRecord, state: IntentState) -> TxIntent {
    TxIntent {
        chain_id: payment.chain_id,
        signer: tx.signer,
        nonce: tx.nonce,
        tx_hashes: vec![tx.hash],
        raw: tx.raw.to_vec(),
        payments: vec![payment.id],
        state,
        created_at_ms: unix_millis(),
        updated_at_ms: unix_millis(),
    }
}

/// `transferWithAuthorization` of the payment as its payer signed it.
fn transfer_call(p: &PaymentRecord) -> Bytes {
    // Accepted payments passed verification: the signature is 65 bytes.
    let signature: &[u8; 65] = p.signature.as_slice().try_into().expect("verified signatures are 65 bytes");
    transfer_with_authorization_calldata(&p.authorization.message(), signature)
}

/// Whether the receipt carries the token's `AuthorizationUsed(from, nonce)`
/// for this payment: the settlement's proof, unambiguous where `Transfer`
/// logs are not.
fn authorization_used(receipt: &TransactionReceipt, p: &PaymentRecord) -> bool {
    receipt.logs().iter().any(|log| {
        let topics = log.topics();
        log.address() == p.asset
            && topics.len() == 3
            && topics[0] == IEip3009::AuthorizationUsed::SIGNATURE_HASH
            && topics[1] == p.authorization.from.into_word()
            && topics[2] == p.authorization.nonce
    })
}
