//! Signatures of payers with code, proved on chain.
//!
//! A token checks a signer that holds code (a contract wallet, an EIP-7702
//! delegated EOA) by calling its ERC-1271 `isValidSignature`, not by
//! `ecrecover` (FiatToken 2.2 `SignatureChecker`), and a wallet not yet
//! deployed (ERC-6492) passes only once its factory has deployed it. x402d
//! asks the chain the same question, and only for such payers: whether a
//! payer holds code comes with its cached balance, and a payer without code
//! keeps the local recovery path.
//!
//! The shard never waits on the network: it hands a [`SignatureRequest`] to
//! a [`SignatureSource`] and parks the payment (and every later one of its
//! payer) until the [`ProofNotifier`] it gave is called, as it does for
//! balance reads. [`ChainSignatures`] gathers the requests of all shards for
//! a few milliseconds and proves up to `max_rows` of them in one `eth_call`
//! of the signature probe (`x402_chain::signature`), its code placed by a
//! state override:
//!
//! ```text
//!  shard ── prove(request, notifier) ──► queue ── gathered (≤ max_rows, ≤ window) ──► one probe eth_call
//!    ▲                                                                                      │
//!    └────────── notifier(Valid | Refused(reason, why) | Err) ◄── one outcome per request ──┘
//! ```
//!
//! What a request runs is what the chain will run: for a payment, the
//! token's own `transferWithAuthorization` as its settlement sends it (the
//! `bytes signature` function, after the factory call of a counterfactual
//! wallet), so a token that cannot take it, a spent nonce or a wallet that
//! refuses all refuse the payment before it is accepted; for a voucher, the
//! signer's `isValidSignature` by STATICCALL, as the channel contract makes
//! it. Each check runs alone with its own gas allowance (`gas_per_check`),
//! its effects undone: a hostile wallet burning gas uses up its own
//! allowance only and is refused, and a wallet one check deploys is gone
//! for the next. A check the call had no gas left for is asked again in
//! the next call.

use std::{
    fmt,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use alloy::primitives::{Address, B256, Bytes};
use tokio::{sync::mpsc, task::AbortHandle};
use x402_chain::{
    Chain,
    signature::{Erc6492, Probe, Probed, Verdict, decode_probes, is_valid_signature_row, probe_calldata, verdict},
};

use crate::{Error, reason::Reason};

/// A signature to prove on chain, for `signer` (which holds code, or which
/// `deploy` deploys).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureRequest {
    /// Whose signature it is: the payment's `from`, the voucher's signer.
    pub signer: Address,
    /// What the chain is asked.
    pub check: Check,
    /// For a counterfactual wallet, the factory call that deploys it first.
    pub deploy: Option<Erc6492>,
}

/// The call a [`SignatureRequest`] proves by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    /// A payment: `calldata` of `token`'s `transferWithAuthorization`, as
    /// its settlement sends it; valid if it succeeds.
    Transfer {
        /// The token.
        token: Address,
        /// The call.
        calldata: Bytes,
    },
    /// A voucher: the signer's `isValidSignature(digest, signature)`, by
    /// STATICCALL; valid if it answers the ERC-1271 magic value.
    Erc1271 {
        /// The digest signed.
        digest: B256,
        /// The signature.
        signature: Bytes,
    },
}

/// What the chain said of a signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The signer approves it: the token will accept it.
    Valid,
    /// Refused, for this reason (the token's, for a transfer that would
    /// revert), and why.
    Refused(Reason, String),
}

/// A proof, or why the chain could not be asked (the payment is answered
/// UNAVAILABLE, never accepted unproved).
pub type Proved = Result<Proof, Arc<Error>>;

/// Called once with a request's proof.
pub struct ProofNotifier(Box<dyn FnOnce(Proved) + Send>);

impl ProofNotifier {
    /// A notifier calling `notify`.
    pub fn new(notify: impl FnOnce(Proved) + Send + 'static) -> Self {
        Self(Box::new(notify))
    }

    /// Delivers the proof; never blocks.
    pub fn notify(self, proved: Proved) {
        (self.0)(proved);
    }
}

impl fmt::Debug for ProofNotifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProofNotifier")
    }
}

/// Proves `request` through `source` and waits for the proof (an async
/// caller's way, the HTTP facilitator's; the shards never wait).
pub async fn prove(source: &dyn SignatureSource, chain_id: u64, request: SignatureRequest) -> Proved {
    let (tx, rx) = tokio::sync::oneshot::channel();
    source.prove(
        chain_id,
        request,
        ProofNotifier::new(move |proved| {
            let _ = tx.send(proved);
        }),
    );
    rx.await.unwrap_or_else(|_| Err(Arc::new(Error::PipelineStopped)))
}

/// Proves signatures of payers with code.
pub trait SignatureSource: Send + Sync + fmt::Debug + 'static {
    /// Proves `request` on chain `chain_id` and calls `done` once with the
    /// result, whatever happens; never blocks the caller.
    fn prove(&self, chain_id: u64, request: SignatureRequest, done: ProofNotifier);
}

/// A node that reads no chain: nothing can be proved, so payers with code
/// are refused.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoSignatures;

impl SignatureSource for NoSignatures {
    fn prove(&self, chain_id: u64, request: SignatureRequest, done: ProofNotifier) {
        done.notify(Ok(Proof::Refused(
            Reason::Signature,
            format!(
                "{} needs an on-chain signature check, and this node reads no chain {chain_id} to ask",
                request.signer
            ),
        )));
    }
}

/// Each chain's prover, by chain id: a request for a chain none proves is
/// refused.
#[derive(Debug, Default)]
pub struct ByChain(std::collections::HashMap<u64, Arc<dyn SignatureSource>>);

impl ByChain {
    /// Proves the signatures of `chain_id` with `source`.
    pub fn insert(&mut self, chain_id: u64, source: Arc<dyn SignatureSource>) {
        self.0.insert(chain_id, source);
    }
}

impl SignatureSource for ByChain {
    fn prove(&self, chain_id: u64, request: SignatureRequest, done: ProofNotifier) {
        match self.0.get(&chain_id) {
            Some(source) => source.prove(chain_id, request, done),
            None => NoSignatures.prove(chain_id, request, done),
        }
    }
}

/// How [`ChainSignatures`] batches its calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSignaturesConfig {
    /// Most requests proved in one call.
    pub max_rows: usize,
    /// Gas each check may use; a check that needs more is refused (a
    /// wallet that costs that much to ask would cost as much to settle).
    pub gas_per_check: u64,
    /// How long the first request of a batch waits for others.
    pub window: Duration,
    /// Calls in flight at most; further batches wait their turn.
    pub max_calls: usize,
    /// A call that takes longer fails (its requests are answered
    /// UNAVAILABLE).
    pub timeout: Duration,
}

impl Default for ChainSignaturesConfig {
    fn default() -> Self {
        Self {
            max_rows: 100,
            gas_per_check: 500_000,
            window: Duration::from_millis(2),
            max_calls: 8,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Counts of what a [`ChainSignatures`] asked the chain.
#[derive(Debug, Default)]
pub struct SignatureStats {
    /// `eth_call`s made.
    pub calls: AtomicU64,
    /// Requests proved, counted once per call they were in (a request the
    /// call had no gas left for counts again in the next).
    pub requests: AtomicU64,
}

type Job = (SignatureRequest, ProofNotifier);

/// Signatures proved by `eth_call`s of the signature probe on one chain,
/// many per call. Dropping it stops its task; requests still queued
/// are answered UNAVAILABLE.
pub struct ChainSignatures {
    chain_id: u64,
    queue: mpsc::UnboundedSender<Job>,
    stats: Arc<SignatureStats>,
    task: AbortHandle,
}

impl ChainSignatures {
    /// Proves signatures on `chain`; its task runs on the current tokio
    /// runtime.
    pub fn new<C: Chain>(chain: Arc<C>, config: ChainSignaturesConfig) -> Self {
        let (queue, jobs) = mpsc::unbounded_channel();
        let stats = Arc::new(SignatureStats::default());
        let chain_id = chain.chain_id();
        let batcher = Batcher { chain, config, stats: stats.clone() };
        let task = tokio::spawn(batcher.run(jobs)).abort_handle();
        Self { chain_id, queue, stats, task }
    }

    /// What it asked the chain so far.
    pub fn stats(&self) -> &SignatureStats {
        &self.stats
    }
}

impl SignatureSource for ChainSignatures {
    fn prove(&self, chain_id: u64, request: SignatureRequest, done: ProofNotifier) {
        if chain_id != self.chain_id {
            let why = format!("signatures are proved on chain {}, not {chain_id}", self.chain_id);
            return done.notify(Ok(Proof::Refused(Reason::InvalidNetwork, why)));
        }
        if let Err(mpsc::error::SendError((_, done))) = self.queue.send((request, done)) {
            done.notify(Err(Arc::new(Error::Timeout("the signature prover has stopped".into()))));
        }
    }
}

impl Drop for ChainSignatures {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl fmt::Debug for ChainSignatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChainSignatures").field("chain_id", &self.chain_id).finish_non_exhaustive()
    }
}

struct Batcher<C> {
    chain: Arc<C>,
    config: ChainSignaturesConfig,
    stats: Arc<SignatureStats>,
}

/// Answers its jobs UNAVAILABLE unless they were answered: whatever happens
/// to the task proving them (an abort, a panic), nobody waits for ever.
struct Answer(Vec<Job>);

impl Drop for Answer {
    fn drop(&mut self) {
        for (_, done) in self.0.drain(..) {
            done.notify(Err(Arc::new(Error::Timeout("the signature check was abandoned".into()))));
        }
    }
}

impl<C: Chain> Batcher<C> {
    async fn run(self, mut jobs: mpsc::UnboundedReceiver<Job>) {
        let this = Arc::new(self);
        let calls = Arc::new(tokio::sync::Semaphore::new(this.config.max_calls.max(1)));
        let max_rows = this.config.max_rows.max(1);
        while let Some(first) = jobs.recv().await {
            let mut batch = Answer(vec![first]);
            let deadline = tokio::time::Instant::now() + this.config.window;
            while batch.0.len() < max_rows {
                match jobs.try_recv() {
                    Ok(job) => batch.0.push(job),
                    Err(_) => match tokio::time::timeout_at(deadline, jobs.recv()).await {
                        Ok(Some(job)) => batch.0.push(job),
                        _ => break,
                    },
                }
            }
            let Ok(place) = calls.clone().acquire_owned().await else { return };
            let this = this.clone();
            tokio::spawn(async move {
                let _place = place;
                let requests: Vec<&SignatureRequest> = batch.0.iter().map(|(r, _)| r).collect();
                let proofs = this.prove_all(&requests).await;
                for ((_, done), proved) in std::mem::take(&mut batch.0).into_iter().zip(proofs) {
                    done.notify(proved);
                }
            });
        }
    }

    /// One proof per request, in order.
    async fn prove_all(&self, requests: &[&SignatureRequest]) -> Vec<Proved> {
        let mut proofs: Vec<Option<Proved>> = vec![None; requests.len()];
        let mut todo: Vec<usize> = (0..requests.len()).collect();
        while !todo.is_empty() {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats.requests.fetch_add(todo.len() as u64, Ordering::Relaxed);
            metrics::counter!(crate::metrics::SIGNATURE_CALLS).increment(1);
            metrics::counter!(crate::metrics::SIGNATURE_PROOFS).increment(todo.len() as u64);
            let probes: Vec<Probe> = todo.iter().map(|&i| probe(requests[i])).collect();
            let outcomes = match self.call(&probes).await {
                Ok(outcomes) => outcomes,
                // The whole call failed in execution (the probe bounds what
                // each check costs it, so this is a node's own limit): each
                // half alone, until one request stands alone.
                Err(Error::Chain(e)) if e.is_execution_failure() && todo.len() > 1 => {
                    let half = todo.split_off(todo.len() / 2);
                    let (first, second) = (
                        Box::pin(self.prove_all(&pick(requests, &todo))).await,
                        Box::pin(self.prove_all(&pick(requests, &half))).await,
                    );
                    for (i, proved) in todo.iter().chain(&half).copied().zip(first.into_iter().chain(second)) {
                        proofs[i] = Some(proved);
                    }
                    break;
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for i in todo {
                        proofs[i] = Some(Err(e.clone()));
                    }
                    break;
                }
            };
            let mut again = Vec::new();
            for (i, outcome) in todo.iter().copied().zip(outcomes) {
                match self.proof(requests[i], outcome) {
                    Some(proof) => proofs[i] = Some(Ok(proof)),
                    None => again.push(i),
                }
            }
            if again.len() == todo.len() {
                // No room for even one check: the node's call gas cap is
                // below one allowance.
                let e = Arc::new(Error::from(x402_chain::Error::Config(format!(
                    "the node's eth_call gas cap leaves no room for a check of {} gas",
                    self.config.gas_per_check
                ))));
                for i in again {
                    proofs[i] = Some(Err(e.clone()));
                }
                break;
            }
            todo = again;
        }
        proofs.into_iter().map(|p| p.expect("every request is proved or failed")).collect()
    }

    /// What `outcome` says of `request`; `None` when it was not run.
    fn proof(&self, request: &SignatureRequest, outcome: Probed) -> Option<Proof> {
        let signer = request.signer;
        let refused = |reason, why: String| Some(Proof::Refused(reason, why));
        match (outcome, &request.check) {
            (Probed::NotRun, _) => None,
            (Probed::OutOfGas, _) => refused(
                Reason::Signature,
                format!("checking {signer}'s signature takes more than {} gas", self.config.gas_per_check),
            ),
            (Probed::FactoryFailed(data), _) => {
                refused(Reason::Signature, format!("the ERC-6492 factory call failed: {}", revert_text(&data)))
            }
            (Probed::Returned(_), Check::Transfer { .. }) => Some(Proof::Valid),
            (Probed::Reverted(data), Check::Transfer { .. }) => {
                let text = revert_text(&data);
                let reason = token_reason(&text);
                refused(reason, format!("the token refuses the transfer from {signer}: {text}"))
            }
            (Probed::Returned(data), Check::Erc1271 { .. }) => {
                match verdict(signer, &x402_chain::batch::RowResult { success: true, data }) {
                    Verdict::Valid => Some(Proof::Valid),
                    Verdict::Invalid(why) | Verdict::Reverted(why) => refused(Reason::Signature, why),
                }
            }
            (Probed::Reverted(data), Check::Erc1271 { .. }) => {
                refused(Reason::Signature, format!("isValidSignature of {signer} reverted: {}", revert_text(&data)))
            }
        }
    }

    /// The outcomes of one probe call of `probes`.
    async fn call(&self, probes: &[Probe]) -> crate::Result<Vec<Probed>> {
        let input = probe_calldata(probes, self.config.gas_per_check);
        let now = crate::domain::unix_millis() / 1000;
        let output = tokio::time::timeout(self.config.timeout, self.chain.probe(input, now))
            .await
            .map_err(|_| Error::Timeout(format!("no answer to a signature check in {:?}", self.config.timeout)))??;
        let outcomes = decode_probes(&output)?;
        if outcomes.len() != probes.len() {
            let got = outcomes.len();
            return Err(
                x402_chain::Error::Decode(format!("the probe answered {got} checks, not {}", probes.len())).into()
            );
        }
        Ok(outcomes)
    }
}

/// The requests at `indices`.
fn pick<'a>(requests: &[&'a SignatureRequest], indices: &[usize]) -> Vec<&'a SignatureRequest> {
    indices.iter().map(|&i| requests[i]).collect()
}

/// The probe that proves `request`.
fn probe(request: &SignatureRequest) -> Probe {
    let (target, data, is_static) = match &request.check {
        Check::Transfer { token, calldata } => (*token, calldata.clone(), false),
        Check::Erc1271 { digest, signature } => {
            let (target, data) = is_valid_signature_row(request.signer, *digest, signature.clone());
            (target, data, true)
        }
    };
    Probe { deploy: request.deploy.clone(), target, data, is_static }
}

/// Revert data in words: its `Error(string)` message, else its hex.
fn revert_text(data: &[u8]) -> String {
    use alloy::sol_types::SolError;
    match alloy::sol_types::Revert::abi_decode(data) {
        Ok(revert) => revert.reason,
        Err(_) if data.is_empty() => "no reason given".into(),
        Err(_) => format!("0x{}", alloy::hex::encode(data)),
    }
}

/// The x402 reason of a token's refusal of a transfer (the FiatToken
/// strings the test token shares with USDC); a refusal x402d cannot name
/// is the signature's, the one thing the payer with code controls.
fn token_reason(message: &str) -> Reason {
    let m = message.to_ascii_lowercase();
    if m.contains("exceeds balance") {
        Reason::InsufficientBalance
    } else if m.contains("used or canceled") || m.contains("used or cancelled") {
        Reason::NonceAlreadyUsed
    } else if m.contains("expired") {
        Reason::ValidBefore
    } else if m.contains("not yet valid") {
        Reason::ValidAfter
    } else {
        Reason::Signature
    }
}
