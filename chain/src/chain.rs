//! [`Chain`]: what settlement needs from an EVM node and its signer keys.
//!
//! The engine's settlers and balance cache are written against this trait.
//! [`AlloyChain`](crate::AlloyChain) implements it on a JSON-RPC node; unit
//! tests may implement it in memory.

use std::{future::Future, time::Duration};

use alloy::primitives::{Address, B256, Bytes, U256};

use crate::{Result, SignedTx};

/// A mined transaction, reduced to what settlement decides on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// The transaction's hash.
    pub tx: B256,
    /// The block it was mined in.
    pub block: u64,
    /// The including block's hash: a reorg shows as a different hash at
    /// `block`.
    pub block_hash: B256,
    /// Blocks from the including block to the head, both counted.
    pub confirmations: u64,
    /// Whether the transaction as a whole succeeded.
    pub success: bool,
    /// Gas it used.
    pub gas_used: u64,
    /// What it paid per gas, in wei.
    pub effective_gas_price: u128,
    /// Every EIP-3009 `AuthorizationUsed(authorizer, nonce)` log, with the
    /// token that emitted it: the proof of which authorizations it settled.
    pub authorizations_used: Vec<AuthorizationUsed>,
}

impl Receipt {
    /// Whether this transaction spent `authorizer`'s `nonce` on `token`.
    pub fn used(&self, token: Address, authorizer: Address, nonce: B256) -> bool {
        self.authorizations_used.iter().any(|u| u.token == token && u.authorizer == authorizer && u.nonce == nonce)
    }
}

/// A channel contract's event: which channel it concerns and whether it is
/// a payer's withdrawal request (which makes a claim urgent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChannelLog {
    /// The block of the event.
    pub block: u64,
    /// The channel it concerns.
    pub channel_id: B256,
    /// A `WithdrawInitiated`.
    pub withdraw_initiated: bool,
}

/// How an EIP-3009 authorization was spent on chain: its
/// `AuthorizationUsed` or `AuthorizationCanceled` log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AuthorizationSpent {
    /// The transaction that spent it.
    pub tx: B256,
    /// The block it was mined in.
    pub block: u64,
    /// The block's timestamp (Unix seconds).
    pub timestamp: u64,
    /// `AuthorizationCanceled`: the payer cancelled it; nothing moved.
    pub canceled: bool,
    /// For a use: the transfer it authorized, the token's `Transfer` log
    /// right after the `AuthorizationUsed` in the same transaction (to,
    /// value), if it is one from the authorizer.
    pub transfer: Option<(Address, U256)>,
}

/// An `AuthorizationUsed` log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AuthorizationUsed {
    /// The token that emitted it.
    pub token: Address,
    /// The payer whose authorization it was.
    pub authorizer: Address,
    /// The authorization's nonce.
    pub nonce: B256,
}

/// A token `Transfer` log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TransferLog {
    /// The block of the transfer.
    pub block: u64,
    /// Who sent.
    pub from: Address,
    /// Who received.
    pub to: Address,
    /// How much, in atomic token units.
    pub value: U256,
}

/// An EVM chain, read and written through a pool of settlement signers.
///
/// Methods return `Send` futures so settlers can run them on spawned tasks.
pub trait Chain: Send + Sync + std::fmt::Debug + 'static {
    /// The chain id the node reported on connect.
    fn chain_id(&self) -> u64;

    /// The settlement signer addresses, in pool order.
    fn signers(&self) -> Vec<Address>;

    /// `owner`'s balance of `token`; [`crate::Error::NoContract`] when no
    /// code is at `token`.
    fn token_balance(&self, token: Address, owner: Address) -> impl Future<Output = Result<U256>> + Send;

    /// Whether `address` holds code: a contract, or an EOA delegated by
    /// EIP-7702. A token checks such a signer's signature with ERC-1271
    /// (FiatToken 2.2 `SignatureChecker`), not with `ecrecover`.
    fn has_code(&self, address: Address) -> impl Future<Output = Result<bool>> + Send;

    /// Whether `authorizer`'s EIP-3009 `nonce` on `token` is spent (or cancelled).
    fn authorization_state(
        &self,
        token: Address,
        authorizer: Address,
        nonce: B256,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// The `AuthorizationUsed` or `AuthorizationCanceled` log of
    /// `authorizer`'s `nonce` on `token` in blocks `from..=to`, if any.
    fn authorization_spent(
        &self,
        token: Address,
        authorizer: Address,
        nonce: B256,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Option<AuthorizationSpent>>> + Send;

    /// The latest block number.
    fn block_number(&self) -> impl Future<Output = Result<u64>> + Send;

    /// The latest block's timestamp (Unix seconds): the time the token last
    /// checked a `validBefore` against. It can lag the true time (a chain
    /// that makes blocks only on demand), never lead it by much.
    fn head_time(&self) -> impl Future<Output = Result<u64>> + Send;

    /// The canonical hash of block `number`, `None` past the head.
    fn block_hash(&self, number: u64) -> impl Future<Output = Result<Option<B256>>> + Send;

    /// `token`'s `Transfer` logs in blocks `from..=to`.
    fn transfer_logs(
        &self,
        token: Address,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<TransferLog>>> + Send;

    /// The `batch-settlement` events of `contract` in blocks `from..=to`,
    /// reduced to the channel each concerns.
    fn channel_logs(
        &self,
        contract: Address,
        from: u64,
        to: u64,
    ) -> impl Future<Output = Result<Vec<ChannelLog>>> + Send;

    /// Runs the call of `to` with `input` against the latest state, as the
    /// first signer would send it. `Ok(Some(message))` when it reverts (the
    /// node's message, revert reason included), `Ok(None)` when it would
    /// succeed, `Err` when the node could not be asked.
    fn simulate(&self, to: Address, input: Bytes) -> impl Future<Output = Result<Option<String>>> + Send;

    /// Runs the call of `to` with `input` against the latest state and
    /// returns its output (a revert is an error).
    fn call(&self, to: Address, input: Bytes) -> impl Future<Output = Result<Bytes>> + Send;

    /// Runs the signature probe ([`crate::signature`]) with `input`, its
    /// code placed at [`crate::signature::PROBE_ADDRESS`] by a state
    /// override, in a block of time `time` (Unix seconds) on the latest
    /// state, and returns its output.
    fn probe(&self, input: Bytes, time: u64) -> impl Future<Output = Result<Bytes>> + Send {
        let _ = (input, time);
        async { Err(crate::Error::Config("this chain cannot run the signature probe".into())) }
    }

    /// The gas `to` with `input` takes now, plus the configured margin.
    fn estimate_gas(&self, to: Address, input: Bytes) -> impl Future<Output = Result<u64>> + Send;

    /// The latest block's gas limit.
    fn block_gas_limit(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Signs a call of `to` with `input` by the next signer of the pool,
    /// with its next nonce, current fees and a gas limit: `gas_limit`, or
    /// an estimate cached per kind of call, which only suits calls whose
    /// cost does not depend on their arguments. Nothing is sent.
    fn sign_call(
        &self,
        to: Address,
        input: Bytes,
        gas_limit: Option<u64>,
    ) -> impl Future<Output = Result<SignedTx>> + Send;

    /// Signs a replacement of `tx`: same signer, nonce, call and gas limit,
    /// fees raised enough for nodes to accept it in place of the original
    /// (and at least to the current market). Nothing is sent.
    fn bump(&self, tx: &SignedTx) -> impl Future<Output = Result<SignedTx>> + Send;

    /// Makes `signer`'s next nonce at least `next`: a restarted engine must
    /// not hand out again a nonce that a recorded (perhaps never broadcast)
    /// intent holds.
    fn floor_nonce(&self, signer: Address, next: u64) -> impl Future<Output = Result<()>> + Send {
        let _ = (signer, next);
        async { Ok(()) }
    }

    /// Fills each nonce of `signer` from its next one on the node up to
    /// `below` that none of `held` (the nonces of recorded intents) takes,
    /// with a zero-value transfer to itself; returns how many it filled. A
    /// transaction without an intent (a deposit, an HTTP channel call)
    /// signed and never sent, by a process that stopped or whose filler
    /// failed, leaves such a gap, and the recorded transactions above it
    /// would wait behind it for ever. A nonce the node says is used, or held
    /// by a transaction in its pool, is left alone, and one that cannot be
    /// filled now does not keep the others unfilled. The signer's keys must
    /// be this node's alone: another sender's transaction not yet seen by
    /// the node would be filled over.
    fn fill_gaps(&self, signer: Address, below: u64, held: &[u64]) -> impl Future<Output = Result<u64>> + Send {
        let _ = (signer, below, held);
        async { Ok(0) }
    }

    /// Fills the nonce of `tx`, signed but never to be sent (its intent
    /// could not be recorded), with a zero-value transfer of the signer to
    /// itself, so that the signer's later transactions are not stuck behind
    /// a gap.
    fn fill_nonce(&self, tx: &SignedTx) -> impl Future<Output = Result<()>> + Send {
        let _ = tx;
        async { Ok(()) }
    }

    /// Sends a signed transaction. Sending one the node already has is not
    /// an error, so a rebroadcast after a crash is safe. A nonce the node
    /// has already seen used answers [`Error::NonceTooLow`](crate::Error::NonceTooLow)
    /// (and resyncs the signer's local nonce): sign again.
    fn broadcast(&self, tx: &SignedTx) -> impl Future<Output = Result<()>> + Send;

    /// The confirmation depth a receipt needs before settlement counts on it.
    fn confirmations(&self) -> u64;

    /// The receipt of `hash` if it is included, at any depth.
    fn receipt(&self, hash: B256) -> impl Future<Output = Result<Option<Receipt>>> + Send;

    /// Polls [`Chain::receipt`] for any of `hashes` (versions of one
    /// transaction) until one has [`Chain::confirmations`], or until
    /// `timeout`; `None` if none did in time.
    fn wait_receipt(&self, hashes: &[B256], timeout: Duration) -> impl Future<Output = Result<Option<Receipt>>> + Send;
}

/// How [`send_and_follow`] follows a transaction to its receipt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Follow {
    /// Unmined this long, the transaction is replaced by a fee bump.
    pub stuck_after: Duration,
    /// Fee bumps at most; after them the last version is only rebroadcast.
    pub max_bumps: u32,
    /// Gives up (`Ok(None)`) after this long.
    pub timeout: Duration,
}

impl Default for Follow {
    fn default() -> Self {
        Self { stuck_after: Duration::from_secs(15), max_bumps: 5, timeout: Duration::from_secs(120) }
    }
}

/// Broadcasts `tx` and waits for a receipt of it or of one of its
/// replacements, for transactions sent outside the settler's write-ahead
/// intents (channel deposits, the HTTP facilitator's channel calls):
/// [`send_new`], then [`follow_sent`].
pub async fn send_and_follow<C: Chain>(chain: &C, tx: SignedTx, follow: Follow) -> Result<Option<Receipt>> {
    send_new(chain, &tx).await?;
    follow_sent(chain, tx, follow).await
}

/// Broadcasts a freshly signed `tx`, asking again after a failure (a node
/// that could not be reached, a rate limit). One that cannot be sent is an
/// error, its nonce filled first ([`Chain::fill_nonce`]): a nonce signed
/// for and never sent would hold up every later transaction of its signer.
/// ([`Error::NonceTooLow`](crate::Error::NonceTooLow) and a replacement
/// refused as underpriced are answered at once, unfilled: the nonce is used,
/// or held by another transaction in the pool, and there is no gap.)
pub async fn send_new<C: Chain>(chain: &C, tx: &SignedTx) -> Result<()> {
    const TRIES: u32 = 4;
    let mut attempt = 0;
    loop {
        let err = match chain.broadcast(tx).await {
            Ok(()) => return Ok(()),
            Err(err @ crate::Error::NonceTooLow { .. }) => return Err(err),
            Err(err) if err.to_string().to_lowercase().contains("replacement transaction underpriced") => {
                return Err(err);
            }
            Err(err) => err,
        };
        attempt += 1;
        if attempt == TRIES {
            fill(chain, tx).await;
            return Err(err);
        }
        tracing::warn!(%err, tx = %tx.hash, attempt, "broadcasting a transaction failed; sending it again");
        tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
    }
}

/// Fills `tx`'s nonce, asking again twice; a failure is only logged (the
/// caller is already answering an error, and the settler fills the gaps
/// that hold up its intents: see [`Chain::fill_gaps`]).
async fn fill<C: Chain>(chain: &C, tx: &SignedTx) {
    for attempt in 1..=3u32 {
        match chain.fill_nonce(tx).await {
            Ok(()) => return,
            Err(err) => {
                tracing::warn!(signer = %tx.signer, nonce = tx.nonce, %err, attempt, "could not fill the nonce of an unsent transaction");
                if attempt < 3 {
                    tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                }
            }
        }
    }
}

/// Waits for a receipt of `tx`, already broadcast, or of one of its
/// replacements.
///
/// Each time it has waited [`Follow::stuck_after`] unmined, it is replaced
/// at the same nonce with higher fees and sent again. Fees below the market
/// leave a transaction unmined, and so does a node that dropped it from its
/// pool: anvil drops a transaction that does not fit a full block, together
/// with every later nonce of its sender, which then wait forever behind the
/// gap. The replacement fills the gap. `Ok(None)` after [`Follow::timeout`],
/// with the nonce filled when no version is mined: a filler priced as the
/// latest version does not outbid it if it is still in the pool, and
/// replaces an earlier, cheaper one still there (the caller is told it was
/// not mined, which the filler makes true).
pub async fn follow_sent<C: Chain>(chain: &C, tx: SignedTx, follow: Follow) -> Result<Option<Receipt>> {
    let started = tokio::time::Instant::now();
    let mut hashes = vec![tx.hash];
    let mut latest = tx;
    loop {
        let left = follow.timeout.saturating_sub(started.elapsed());
        if let Some(receipt) = chain.wait_receipt(&hashes, follow.stuck_after.min(left)).await? {
            return Ok(Some(receipt));
        }
        // Mined, but not yet deep enough: wait on.
        let included = any_included(chain, &hashes).await?;
        if started.elapsed() >= follow.timeout {
            if !included {
                fill(chain, &latest).await;
            }
            return Ok(None);
        }
        if included {
            continue;
        }
        if hashes.len() <= follow.max_bumps as usize {
            latest = chain.bump(&latest).await?;
            hashes.push(latest.hash);
            tracing::info!(tx = %hashes[0], replacement = %latest.hash, "replaced an unmined transaction");
        }
        match chain.broadcast(&latest).await {
            // An earlier version was mined meanwhile: the next wait finds it.
            Ok(()) | Err(crate::Error::NonceTooLow { .. }) => {}
            Err(err) => tracing::warn!(%err, tx = %latest.hash, "a replacement was not accepted; will try again"),
        }
    }
}

/// Whether any of `hashes` (versions of one transaction) is mined, at any depth.
pub async fn any_included<C: Chain>(chain: &C, hashes: &[B256]) -> Result<bool> {
    for hash in hashes {
        if chain.receipt(*hash).await?.is_some() {
            return Ok(true);
        }
    }
    Ok(false)
}
