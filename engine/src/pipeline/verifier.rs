//! Stage 1's threads: each takes submissions off the verify queue, runs the
//! stateless checks (an `exact` payment's steps 1–8, a voucher's config,
//! channel id and signature) and hands what passes to the shard that owns
//! its payer or channel.

use alloy::primitives::{Address, B256};
use crossbeam::channel::{Receiver, Sender};

use super::{SubmitOutcome, VerifyJob, messages::ShardMsg};
use crate::{
    channels::VoucherVerifier,
    domain::{Clock, Submission},
    verify::{Refusal, Verifier},
};

/// The shard that owns `payer`. Addresses are hashes, so their leading bytes
/// spread evenly.
pub(super) fn shard_of(payer: Address, shards: usize) -> usize {
    let lead = u64::from_be_bytes(payer[..8].try_into().expect("8 bytes"));
    (lead % shards as u64) as usize
}

/// The shard of a channel: its requests are checked there one at a time.
pub(super) fn shard_of_channel(id: B256, shards: usize) -> usize {
    let lead = u64::from_be_bytes(id[..8].try_into().expect("8 bytes"));
    (lead % shards as u64) as usize
}

/// The verifier loop: until the verify queue closes or the shards are gone.
pub(super) fn run_verifier(
    verifier: &mut Verifier,
    vouchers: &mut VoucherVerifier,
    rx: &Receiver<VerifyJob>,
    shards: &[Sender<ShardMsg>],
    clock: &Clock,
) {
    metrics::gauge!(crate::metrics::QUEUE_DEPTH, "stage" => "verify").set(0.0);
    let mut since_gauge = 0u32;
    while let Ok(job) = rx.recv() {
        since_gauge += 1;
        if since_gauge == 1024 {
            since_gauge = 0;
            metrics::gauge!(crate::metrics::QUEUE_DEPTH, "stage" => "verify").set(rx.len() as f64);
        }
        let now = clock.verification_time();
        let VerifyJob { merchant, submission, reply, dry_run } = job;
        let submission = match submission {
            Submission { requirements, input: crate::domain::PaymentInput::Voucher(payload), .. } => {
                match vouchers.verify(&merchant, &requirements, *payload) {
                    Ok(mut verified) => {
                        verified.dry_run = dry_run;
                        let shard = shard_of_channel(verified.channel_id, shards.len());
                        if shards[shard].send(ShardMsg::Voucher { merchant, verified, reply }).is_err() {
                            return;
                        }
                    }
                    Err(refusal) => {
                        let _ = reply.send(match refusal {
                            Refusal::Rejected { payer, rejection, .. } => {
                                crate::metrics::rejected(rejection.reason);
                                SubmitOutcome::VoucherRejected { payer, rejection, channel: None }
                            }
                            Refusal::Invalid(field) => SubmitOutcome::Invalid(field),
                        });
                    }
                }
                continue;
            }
            exact => exact,
        };
        match verifier.verify(&merchant, submission, now) {
            Ok(mut verified) => {
                verified.dry_run = dry_run;
                let shard = shard_of(verified.payer(), shards.len());
                if shards[shard].send(ShardMsg::Payment { merchant, verified, reply }).is_err() {
                    return;
                }
            }
            Err(refusal) => {
                match &refusal {
                    Refusal::Rejected { rejection, .. } => crate::metrics::rejected(rejection.reason),
                    Refusal::Invalid(_) => metrics::counter!(crate::metrics::SUBMITS_INVALID).increment(1),
                }
                let _ = reply.send(refusal.into());
            }
        }
    }
}
