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
//! of Multicall3's `aggregate3`: per request, the factory row of a
//! counterfactual wallet, then its `isValidSignature` row, so one call
//! deploys and checks many wallets against the latest state.
//!
//! ```text
//!  shard ── prove(request, notifier) ──► queue ── gathered (≤ max_rows, ≤ window) ──► aggregate3 eth_call
//!    ▲                                                                                      │
//!    └────────────── notifier(Valid | Invalid(why) | Err) ◄── one verdict per request ──────┘
//! ```
//!
//! A reverted row is ambiguous in a batch: a hostile wallet that burns all
//! the gas it is given starves the rows after it. Reverted rows are
//! therefore proved again without the rows that answered, and a group in
//! which every row reverted is halved, until each reverting row stands
//! alone; only then is its revert a refusal. Honest rows never cost more
//! than their first call.

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
    batch::{aggregate3_calldata, decode_aggregate3},
    signature::{Erc6492, Verdict, is_valid_signature_row, verdict},
};

use crate::Error;

/// A signature to prove on chain: `signer` (which holds code, or which
/// `deploy` deploys) approves `signature` of `digest`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignatureRequest {
    /// Who must approve it: the payment's `from`.
    pub signer: Address,
    /// The EIP-712 digest the token will check.
    pub digest: B256,
    /// The signature the token will be given (an ERC-6492 wrapper's inner
    /// signature).
    pub signature: Bytes,
    /// For a counterfactual wallet, the factory call that deploys it.
    pub deploy: Option<Erc6492>,
}

/// What the chain said of a signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Proof {
    /// The signer approves it: the token will accept it.
    Valid,
    /// It does not, and why.
    Invalid(String),
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
        done.notify(Ok(Proof::Invalid(format!(
            "{} needs an on-chain signature check, and this node reads no chain {chain_id} to ask",
            request.signer
        ))));
    }
}

/// How [`ChainSignatures`] batches its calls.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSignaturesConfig {
    /// Most requests proved in one call.
    pub max_rows: usize,
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
        Self { max_rows: 100, window: Duration::from_millis(2), max_calls: 8, timeout: Duration::from_secs(5) }
    }
}

/// Counts of what a [`ChainSignatures`] asked the chain.
#[derive(Debug, Default)]
pub struct SignatureStats {
    /// `eth_call`s made.
    pub calls: AtomicU64,
    /// Requests proved.
    pub requests: AtomicU64,
}

type Job = (SignatureRequest, ProofNotifier);

/// Signatures proved by `eth_call`s of Multicall3 `aggregate3` on one
/// chain, many per call. Dropping it stops its task; requests still queued
/// are answered UNAVAILABLE.
pub struct ChainSignatures {
    chain_id: u64,
    queue: mpsc::UnboundedSender<Job>,
    stats: Arc<SignatureStats>,
    task: AbortHandle,
}

impl ChainSignatures {
    /// Proves signatures on `chain` through the Multicall3 at `multicall`;
    /// its task runs on the current tokio runtime.
    pub fn new<C: Chain>(chain: Arc<C>, multicall: Address, config: ChainSignaturesConfig) -> Self {
        let (queue, jobs) = mpsc::unbounded_channel();
        let stats = Arc::new(SignatureStats::default());
        let chain_id = chain.chain_id();
        let batcher = Batcher { chain, multicall, config, stats: stats.clone() };
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
            return done.notify(Ok(Proof::Invalid(format!(
                "signatures are proved on chain {}, not {chain_id}",
                self.chain_id
            ))));
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
    multicall: Address,
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
        let mut groups = vec![(0..requests.len()).collect::<Vec<_>>()];
        while let Some(group) = groups.pop() {
            self.stats.calls.fetch_add(1, Ordering::Relaxed);
            self.stats.requests.fetch_add(group.len() as u64, Ordering::Relaxed);
            metrics::counter!(crate::metrics::SIGNATURE_CALLS).increment(1);
            metrics::counter!(crate::metrics::SIGNATURE_PROOFS).increment(group.len() as u64);
            let halve = |groups: &mut Vec<Vec<usize>>, group: Vec<usize>| {
                let (a, b) = group.split_at(group.len() / 2);
                groups.push(a.to_vec());
                groups.push(b.to_vec());
            };
            let reverted = |e: &Error| matches!(e, Error::Chain(c) if c.is_execution_failure());
            match self.call(group.iter().map(|&i| requests[i])).await {
                Err(e) if reverted(&e) && group.len() > 1 => halve(&mut groups, group),
                Err(e) if reverted(&e) => {
                    let why = format!("the check of {} ran out of gas or reverted: {e}", requests[group[0]].signer);
                    proofs[group[0]] = Some(Ok(Proof::Invalid(why)));
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for i in group {
                        proofs[i] = Some(Err(e.clone()));
                    }
                }
                Ok(verdicts) => {
                    let alone = group.len() == 1;
                    let mut again = Vec::new();
                    for (i, v) in group.iter().copied().zip(verdicts) {
                        proofs[i] = Some(Ok(match v {
                            Verdict::Valid => Proof::Valid,
                            Verdict::Invalid(why) => Proof::Invalid(why),
                            Verdict::Reverted(why) if alone => Proof::Invalid(why),
                            Verdict::Reverted(_) => {
                                again.push(i);
                                continue;
                            }
                        }));
                    }
                    match again.len() {
                        0 => {}
                        n if n == group.len() => halve(&mut groups, again),
                        _ => groups.push(again),
                    }
                }
            }
        }
        proofs.into_iter().map(|p| p.expect("every request is proved or failed")).collect()
    }

    /// The verdicts of one `aggregate3` call proving `requests`.
    async fn call<'a>(
        &self,
        requests: impl Iterator<Item = &'a SignatureRequest>,
    ) -> crate::Result<Vec<Verdict>> {
        let mut rows = Vec::new();
        let mut checks = Vec::new();
        for r in requests {
            if let Some(deploy) = &r.deploy {
                rows.push(deploy.deploy_row());
            }
            checks.push((rows.len(), r.signer));
            rows.push(is_valid_signature_row(r.signer, r.digest, r.signature.clone()));
        }
        let call = self.chain.call(self.multicall, aggregate3_calldata(rows));
        let output = tokio::time::timeout(self.config.timeout, call)
            .await
            .map_err(|_| Error::Timeout(format!("no answer to a signature check in {:?}", self.config.timeout)))??;
        let results = decode_aggregate3(&output)?;
        checks
            .into_iter()
            .map(|(row, signer)| {
                results.get(row).map(|r| verdict(signer, r)).ok_or_else(|| {
                    Error::from(x402_chain::Error::Decode(format!(
                        "aggregate3 answered {} rows, fewer than asked",
                        results.len()
                    )))
                })
            })
            .collect()
    }
}
