//! [`Engine`]: the ledger, the pipeline and the merchants, put together.
//! The gRPC and HTTP adapters are thin layers over it.

use std::sync::Arc;

use alloy::primitives::Address;
use tokio::sync::{Mutex, oneshot, watch};

use crate::{
    Error, Result,
    balance::BalanceSource,
    domain::{
        AcceptedAsset, Merchant, PaymentId, PaymentRecord, PendingKey, SettlementEvent, SettlementPolicy, Submission,
        TxIntent, unix_millis,
    },
    ledger::Ledger,
    merchants::{MerchantRegistry, hash_api_key},
    pipeline::{IntentChange, Overloaded, Pipeline, PipelineConfig, SubmitOutcome, Transition},
};

/// The shortest API or admin key accepted.
pub(crate) const MIN_KEY_LEN: usize = 16;

/// A merchant as an administrator sets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MerchantUpdate {
    /// The merchant id (1–64 characters of `[A-Za-z0-9_.-]`).
    pub id: String,
    /// The addresses it is paid at.
    pub pay_to: Vec<Address>,
    /// The networks and tokens it accepts (empty: any).
    pub assets: Vec<AcceptedAsset>,
    /// How its payments are settled.
    pub policy: SettlementPolicy,
    /// A new API key in plain text; `None` keeps the current one.
    pub api_key: Option<String>,
}

/// The running engine.
#[derive(Debug)]
pub struct Engine {
    ledger: Arc<dyn Ledger>,
    pipeline: Pipeline,
    merchants: MerchantRegistry,
    admin_key_sha256: Option<[u8; 32]>,
    /// Serialises merchant writes (rare; never on the payment path).
    merchant_writes: Mutex<()>,
}

/// The most events [`Engine::recent_payments`] reads.
pub(crate) const RECENT_EVENTS_READ: usize = 2_000;

impl Engine {
    /// Starts the engine on `ledger`: loads merchants, rebuilds the pipeline
    /// state and starts its threads. `admin_key` enables merchant admin.
    pub fn start(
        ledger: Arc<dyn Ledger>,
        balances: &Arc<dyn BalanceSource>,
        pipeline: &PipelineConfig,
        admin_key: Option<&str>,
    ) -> Result<Self> {
        if let Some(key) = admin_key
            && key.len() < MIN_KEY_LEN
        {
            return Err(Error::Config(format!("the admin key must be at least {MIN_KEY_LEN} characters")));
        }
        let merchants = MerchantRegistry::new(ledger.merchants()?);
        let pipeline = Pipeline::start(pipeline, &ledger, balances)?;
        Ok(Self {
            ledger,
            pipeline,
            merchants,
            admin_key_sha256: admin_key.map(hash_api_key),
            merchant_writes: Mutex::new(()),
        })
    }

    /// The merchant whose API key is `key`.
    pub fn authenticate(&self, key: &str) -> Option<Arc<Merchant>> {
        self.merchants.authenticate(key)
    }

    /// Whether `key` is the admin key.
    pub fn is_admin(&self, key: &str) -> bool {
        self.admin_key_sha256.is_some_and(|h| h == hash_api_key(key))
    }

    /// The current version of a merchant (its policy may have changed since
    /// a stream authenticated).
    pub fn merchant(&self, id: &str) -> Option<Arc<Merchant>> {
        self.merchants.get(id)
    }

    /// Every merchant, as registered now.
    pub fn merchants(&self) -> Vec<Arc<Merchant>> {
        self.merchants.list()
    }

    /// Queues a payment; see [`Pipeline::try_submit`].
    pub fn try_submit(
        &self,
        merchant: Arc<Merchant>,
        submission: Submission,
    ) -> Result<oneshot::Receiver<SubmitOutcome>, Overloaded> {
        self.pipeline.try_submit(merchant, submission)
    }

    /// Checks a submission without recording it; see [`Pipeline::try_verify`].
    pub async fn verify(&self, merchant: Arc<Merchant>, submission: Submission) -> Result<SubmitOutcome, Overloaded> {
        let rx = self.pipeline.try_verify(merchant, submission)?;
        Ok(rx.await.unwrap_or_else(|_| SubmitOutcome::Unavailable("pipeline stopped".into())))
    }

    /// Submits and waits for the final outcome (or `Overloaded`).
    pub async fn submit(&self, merchant: Arc<Merchant>, submission: Submission) -> Result<SubmitOutcome, Overloaded> {
        let rx = self.try_submit(merchant, submission)?;
        Ok(rx.await.unwrap_or_else(|_| SubmitOutcome::Unavailable("pipeline stopped".into())))
    }

    /// Creates or updates a merchant, durably, and makes it visible.
    pub async fn upsert_merchant(&self, update: MerchantUpdate) -> Result<Arc<Merchant>> {
        if update.pay_to.is_empty() {
            return Err(Error::InvalidMerchant(format!(
                "merchant {:?}: pay_to needs at least one address (the addresses it is paid at)",
                update.id
            )));
        }
        if let Some(key) = &update.api_key {
            if key.len() < MIN_KEY_LEN {
                return Err(Error::InvalidMerchant(format!(
                    "merchant {:?}: api_key must be at least {MIN_KEY_LEN} characters",
                    update.id
                )));
            }
            if self.is_admin(key) {
                return Err(Error::InvalidMerchant(format!(
                    "merchant {:?}: api_key must not be the admin key",
                    update.id
                )));
            }
        }
        let _guard = self.merchant_writes.lock().await;
        let existing = self.merchants.get(&update.id);
        let merchant = Merchant {
            number: existing.as_ref().map_or_else(|| self.merchants.next_number(), |m| m.number),
            api_key_sha256: match &update.api_key {
                Some(key) => Some(hash_api_key(key)),
                None => existing.as_ref().and_then(|m| m.api_key_sha256),
            },
            id: update.id,
            pay_to: update.pay_to,
            assets: update.assets,
            policy: update.policy,
            updated_at_ms: unix_millis(),
        };
        if let Some(hash) = merchant.api_key_sha256
            && let Some(other) = self.merchants.list().into_iter().find(|m| m.api_key_sha256 == Some(hash))
            && other.id != merchant.id
        {
            return Err(Error::DuplicateApiKey { merchant: other.id.clone() });
        }
        let written = self.pipeline.write_merchant(merchant.clone())?;
        written.await.map_err(|_| Error::PipelineStopped)??;
        let id = merchant.id.clone();
        self.merchants.insert(merchant);
        Ok(self.merchants.get(&id).expect("just inserted"))
    }

    /// A payment from the ledger.
    pub async fn payment(&self, id: PaymentId) -> Result<Option<PaymentRecord>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.payment(&id)).await.map_err(|_| Error::PipelineStopped)?
    }

    /// The payments a settlement transaction `tx` settled or tried to
    /// (any version of it), from the ledger's index.
    pub async fn payments_by_transaction(&self, tx: alloy::primitives::B256) -> Result<Vec<PaymentRecord>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.payments_by_transaction(&tx))
            .await
            .map_err(|_| Error::PipelineStopped)?
    }

    /// Merchant `merchant_number`'s `limit` most recently changed payments,
    /// newest first, from its events (those retention kept), reading at
    /// most `RECENT_EVENTS_READ` (2,000) of them: a channel merchant's history is
    /// mostly its channels'.
    pub async fn recent_payments(&self, merchant_number: u32, limit: usize) -> Result<Vec<PaymentRecord>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || {
            let mut ids = Vec::with_capacity(limit);
            let mut seen = std::collections::HashSet::new();
            let (mut before, mut read) = (u64::MAX, 0);
            while ids.len() < limit && read < RECENT_EVENTS_READ {
                let page = ledger.merchant_events_before(merchant_number, before, 256)?;
                let Some(last) = page.last() else { break };
                before = last.sequence;
                read += page.len();
                // A channel's events name the channel, not a payment.
                for e in page.iter().filter(|e| e.channel.is_none()) {
                    if ids.len() < limit && seen.insert(e.payment_id) {
                        ids.push(e.payment_id);
                    }
                }
            }
            let mut payments: std::collections::HashMap<PaymentId, PaymentRecord> =
                ledger.payments(&ids)?.into_iter().map(|p| (p.id, p)).collect();
            let theirs = |p: &PaymentRecord| p.merchant_number == merchant_number;
            Ok(ids.iter().filter_map(|id| payments.remove(id)).filter(theirs).collect())
        })
        .await
        .map_err(|_| Error::PipelineStopped)?
    }

    /// Deletes the settled payments whose `validBefore`, and the events
    /// last updated, are before `before` (Unix seconds); see
    /// [`Ledger::prune`].
    pub async fn prune(&self, before: u64) -> Result<crate::ledger::Pruned> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.prune(before)).await.map_err(|_| Error::PipelineStopped)?
    }

    /// Up to `limit` events after `after`.
    pub async fn events_after(&self, after: u64, limit: usize) -> Result<Vec<SettlementEvent>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.events_after(after, limit))
            .await
            .map_err(|_| Error::PipelineStopped)?
    }

    /// The head of each merchant's settlement queue (its first
    /// `per_merchant` payments), from the ledger.
    pub async fn settlement_queue_head(&self, per_merchant: usize) -> Result<Vec<PendingKey>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.pending_head(per_merchant))
            .await
            .map_err(|_| Error::PipelineStopped)?
    }

    /// Every transaction intent, from the ledger.
    pub async fn intents(&self) -> Result<Vec<TxIntent>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.intents()).await.map_err(|_| Error::PipelineStopped)?
    }

    /// Records settlement progress durably; see [`Pipeline::record_settlement`].
    pub async fn record_settlement(&self, intents: Vec<IntentChange>, transitions: Vec<Transition>) -> Result<()> {
        self.pipeline.record_settlement(intents, transitions)?.await.map_err(|_| Error::PipelineStopped)?
    }

    /// Every payment channel, from the ledger.
    pub async fn channels(&self) -> Result<Vec<crate::domain::ChannelRecord>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.channels()).await.map_err(|_| Error::PipelineStopped)?
    }

    /// Merchant `merchant_id`'s channels, from the ledger's index.
    pub async fn merchant_channels(&self, merchant_id: String) -> Result<Vec<crate::domain::ChannelRecord>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.merchant_channels(&merchant_id))
            .await
            .map_err(|_| Error::PipelineStopped)?
    }

    /// Up to `limit` of merchant `merchant_number`'s events after `after`,
    /// from the ledger's index.
    pub async fn merchant_events_after(
        &self,
        merchant_number: u32,
        after: u64,
        limit: usize,
    ) -> Result<Vec<SettlementEvent>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ledger.merchant_events_after(merchant_number, after, limit))
            .await
            .map_err(|_| Error::PipelineStopped)?
    }

    /// The channels of `ids` that the ledger has, from the ledger.
    pub async fn channels_by_id(&self, ids: Vec<alloy::primitives::B256>) -> Result<Vec<crate::domain::ChannelRecord>> {
        let ledger = self.ledger.clone();
        tokio::task::spawn_blocking(move || ids.iter().filter_map(|id| ledger.channel(id).transpose()).collect())
            .await
            .map_err(|_| Error::PipelineStopped)?
    }

    /// Interest in payment `id`; see [`crate::pipeline::PaymentWaiters`].
    pub fn wait_for_payment(&self, id: PaymentId) -> crate::pipeline::Waiter {
        self.pipeline.wait_for_payment(id)
    }

    /// The channels committed since the last look; see
    /// [`crate::pipeline::ChangedChannels`].
    pub fn changed_channels(&self) -> Arc<crate::pipeline::ChangedChannels> {
        self.pipeline.changed_channels()
    }

    /// Mirrors and records a fresh read of a channel; see
    /// [`Pipeline::sync_channel`].
    pub async fn sync_channel(
        &self,
        id: alloy::primitives::B256,
        onchain: x402_channel::OnChain,
        claimed: Option<crate::channels::ClaimOutcome>,
    ) -> Result<()> {
        self.pipeline.sync_channel(id, onchain, claimed)?.await.map_err(|_| Error::PipelineStopped)?
    }

    /// Asks for a claim or a refund of a channel; see
    /// [`Pipeline::request_channel`].
    pub async fn request_channel(
        &self,
        id: alloy::primitives::B256,
        claim: bool,
        refund: Option<u128>,
    ) -> Result<Option<crate::channels::ChannelView>> {
        self.pipeline.request_channel(id, claim, refund)?.await.map_err(|_| Error::PipelineStopped)?
    }

    /// Follows the sequence of the last durable event.
    pub fn event_sequence(&self) -> watch::Receiver<u64> {
        self.pipeline.events()
    }

    /// The name of a pipeline thread that died, once one has: the engine
    /// then answers no payment and its process should be restarted.
    pub fn pipeline_died(&self) -> watch::Receiver<Option<String>> {
        self.pipeline.died()
    }
}
