//! The channel half of a [`Shard`]: `batch-settlement` vouchers checked
//! against the channels this shard owns, parked behind a read of a
//! channel's on-chain state or behind the deposit a voucher carries, and
//! resumed in arrival order when the read or deposit reports back.

use std::sync::Arc;

use alloy::primitives::{Address, B256};
use tokio::sync::oneshot;

use super::Shard;
use crate::{
    SubmitOutcome,
    channels::{ChannelFetched, ChannelView, DepositFailure, ReadFailure, VerifiedVoucher, new_record},
    domain::Merchant,
    pipeline::messages::CommitItem,
    reason::Rejection,
};

/// A voucher waiting for its channel's on-chain state.
pub(super) struct ParkedVoucher {
    pub(super) merchant: Arc<Merchant>,
    pub(super) verified: VerifiedVoucher,
    pub(super) reply: oneshot::Sender<SubmitOutcome>,
}

/// Why a voucher of a contract signer's channel is proved.
const CONTRACT_SIGNER: &str = "its channel's signer is a contract, which decides";

impl Shard {
    /// Whether `v` is of a channel whose record says (durably) that its
    /// signer is a contract, and is not proved yet: every voucher of such a
    /// channel is proved before it counts, even one that recovers.
    fn signed_by_contract_unproved(&self, v: &VerifiedVoucher) -> bool {
        !v.proved && self.channels.get(&v.channel_id).is_some_and(|r| r.contract_signer)
    }

    /// A voucher for one of this shard's channels: checked now, or parked
    /// behind a read of the channel's on-chain state (or behind the deposit
    /// it carries). False when the committer is gone.
    pub(super) fn voucher(
        &mut self,
        merchant: Arc<Merchant>,
        mut verified: VerifiedVoucher,
        reply: oneshot::Sender<SubmitOutcome>,
    ) -> bool {
        let id = verified.channel_id;
        let unproved = verified
            .unproved
            .take()
            .or_else(|| self.signed_by_contract_unproved(&verified).then(|| CONTRACT_SIGNER.to_owned()));
        if let Some(why) = unproved {
            self.prove_voucher(ParkedVoucher { merchant, verified, reply }, &why);
            return true;
        }
        if verified.proved
            && let Some(record) = self.channels.get_mut(&id)
        {
            // Written with the record's next change.
            record.contract_signer = true;
        }
        if let Some(queue) = self.parked_vouchers.get_mut(&id) {
            if queue.len() >= Self::MAX_PARKED_PER_CHANNEL {
                let message = format!("too many requests of channel {id} wait for its deposit or its read; retry");
                let _ = reply.send(SubmitOutcome::Unavailable(message));
                return true;
            }
            if self.parked_vouchers_len >= self.max_parked {
                let _ = reply.send(SubmitOutcome::Unavailable("too many vouchers wait for channel reads".into()));
                return true;
            }
            queue.push(ParkedVoucher { merchant, verified, reply });
            self.parked_vouchers_len += 1;
            return true;
        }
        if !self.channels.contains_key(&id) {
            // Unknown: read first, also before a deposit, whose voucher is
            // checked against the channel before the deposit goes on chain.
            self.fetch_channel(&verified, ParkedVoucher { merchant, verified: verified.clone(), reply });
            return true;
        }
        if verified.deposit.is_some() && !verified.dry_run {
            if self.parked_vouchers_len >= self.max_parked {
                let _ = reply.send(SubmitOutcome::Unavailable("too many vouchers wait for deposits; retry".into()));
                return true;
            }
            let parked = ParkedVoucher { merchant, verified, reply };
            if let Some(parked) = self.deposit_allowed(parked) {
                self.start_deposit(parked, Vec::new());
            }
            return true;
        }
        self.check_voucher(merchant, verified, reply, true)
    }

    /// Has the signature of `parked`, which does not recover to its signer
    /// (`why`), proved on chain: valid only if the signer is a contract that
    /// approves it (ERC-1271), as the channel contract will check it. The
    /// voucher comes back through [`Shard::voucher_proved`].
    fn prove_voucher(&mut self, parked: ParkedVoucher, why: &str) {
        let channel = parked.verified.channel_id;
        let proving = self.proving_per_channel.get(&channel).copied().unwrap_or_default();
        if self.parked_vouchers_len >= self.max_parked || proving >= Self::MAX_PARKED_PER_CHANNEL {
            let _ = parked.reply.send(SubmitOutcome::Unavailable("too many vouchers wait for checks; retry".into()));
            return;
        }
        *self.proving_per_channel.entry(channel).or_default() += 1;
        let v = &parked.verified;
        let signer = crate::channels::voucher_signer(&v.config);
        // The bytes its claim will send.
        let signature = crate::ecdsa::as_claimed(&v.signature, v.digest, signer);
        let request = crate::signature::SignatureRequest {
            signer,
            check: crate::signature::Check::Erc1271 { digest: v.digest, signature },
            deploy: None,
        };
        let (ticket, chain_id) = (self.next_ticket, v.chain_id);
        self.next_ticket += 1;
        let control = self.control.clone();
        let done = crate::signature::ProofNotifier::new(move |proved| {
            let _ = control.send(crate::pipeline::messages::ShardMsg::VoucherProved { ticket, proved });
        });
        tracing::debug!(shard = self.index, channel = %v.channel_id, %why, "voucher signature sent to be proved on chain");
        self.proving_vouchers.insert(ticket, parked);
        self.parked_vouchers_len += 1;
        self.signatures.prove(chain_id, request, done);
    }

    /// The on-chain proof of a voucher's signature came back: on it goes,
    /// or it is refused. False when the committer is gone.
    pub(super) fn voucher_proved(&mut self, ticket: u64, proved: crate::signature::Proved) -> bool {
        let Some(ParkedVoucher { merchant, mut verified, reply }) = self.proving_vouchers.remove(&ticket) else {
            return true;
        };
        self.parked_vouchers_len -= 1;
        let channel = verified.channel_id;
        if let Some(n) = self.proving_per_channel.get_mut(&channel) {
            *n -= 1;
            if *n == 0 {
                self.proving_per_channel.remove(&channel);
            }
        }
        match proved {
            Ok(crate::signature::Proof::Valid) => {
                verified.proved = true;
                self.voucher(merchant, verified, reply)
            }
            Ok(crate::signature::Proof::Refused(_, why)) => {
                crate::metrics::rejected(crate::reason::Reason::VoucherSignature);
                let channel = self.channels.get(&verified.channel_id).map(|r| ChannelView::from(&r.channel));
                let _ = reply.send(SubmitOutcome::VoucherRejected {
                    payer: Some(verified.config.payer),
                    rejection: Rejection::new(crate::reason::Reason::VoucherSignature, format!("voucher {why}")),
                    channel,
                });
                true
            }
            Err(e) => {
                let _ = reply.send(SubmitOutcome::Unavailable(format!(
                    "the voucher's signature could not be checked on chain: {}",
                    e.for_clients()
                )));
                true
            }
        }
    }

    /// The voucher rules for `parked`, whose deposit counts as made (as in
    /// a dry run): nothing goes on chain for a voucher that would be
    /// refused after it. `None` when it was refused (and answered).
    fn deposit_allowed(&mut self, parked: ParkedVoucher) -> Option<ParkedVoucher> {
        let v = &parked.verified;
        let record = self.channels.get(&v.channel_id).expect("read before its deposit");
        if self.unclaimable.contains(&v.channel_id) {
            let _ = parked.reply.send(SubmitOutcome::VoucherRejected {
                payer: Some(v.config.payer),
                rejection: Rejection::new(
                    crate::reason::Reason::VoucherSignature,
                    "this channel's claim reverts on chain: nothing is deposited into it",
                ),
                channel: Some(ChannelView::from(&record.channel)),
            });
            return None;
        }
        let deposit = v.deposit.as_ref().map_or(0, |d| d.amount);
        let policy = crate::channels::claim_policy(&parked.merchant);
        let rule = match v.refund {
            Some(_) => record.channel.check_refund(v.max_claimable),
            None => record.channel.check_voucher(v.max_claimable, v.amount, deposit, self.clock.now_secs(), &policy),
        };
        match rule {
            Ok(()) => Some(parked),
            Err(e) => {
                crate::metrics::rejected(crate::reason::Reason::from(e));
                let _ = parked.reply.send(voucher_rejected(v.config.payer, e, &record.channel));
                None
            }
        }
    }

    /// The vouchers waiting for channel `id`'s read or deposit.
    fn take_parked_vouchers(&mut self, id: B256) -> Option<Vec<ParkedVoucher>> {
        let queue = self.parked_vouchers.remove(&id)?;
        self.parked_vouchers_len -= queue.len();
        Some(queue)
    }

    /// Reads a channel's on-chain state; `first` waits for it.
    fn fetch_channel(&mut self, v: &VerifiedVoucher, first: ParkedVoucher) {
        if self.parked_vouchers_len >= self.max_parked {
            let _ = first.reply.send(SubmitOutcome::Unavailable("too many vouchers wait for channel reads".into()));
            return;
        }
        tracing::debug!(shard = self.index, channel = %v.channel_id, "voucher parked until its channel is read");
        self.parked_vouchers.insert(v.channel_id, vec![first]);
        self.parked_vouchers_len += 1;
        self.channel_source.fetch(v, self.channel_notifier.clone());
    }

    /// The voucher rules against the channel's state. A voucher refused for
    /// the balance, against a mirror older than [`Self::CHANNEL_REFRESH`],
    /// re-reads the channel once (a top-up the engine has not seen).
    fn check_voucher(
        &mut self,
        merchant: Arc<Merchant>,
        v: VerifiedVoucher,
        reply: oneshot::Sender<SubmitOutcome>,
        may_refresh: bool,
    ) -> bool {
        let now_ms = self.clock.now_ms();
        let now = now_ms / 1000;
        if self.unclaimable.contains(&v.channel_id) && v.refund.is_none() {
            crate::metrics::rejected(crate::reason::Reason::VoucherSignature);
            let channel = self.channels.get(&v.channel_id).map(|r| ChannelView::from(&r.channel));
            let _ = reply.send(SubmitOutcome::VoucherRejected {
                payer: Some(v.config.payer),
                rejection: Rejection::new(
                    crate::reason::Reason::VoucherSignature,
                    "this channel's claim reverts on chain: its vouchers cannot be claimed, so new ones are refused",
                ),
                channel,
            });
            return true;
        }
        let policy = crate::channels::claim_policy(&merchant);
        let record = self.channels.get_mut(&v.channel_id).expect("checked by the caller");
        // A deposit still carried here is a dry run's: it counts as if made.
        let deposit = v.deposit.as_ref().map_or(0, |d| d.amount);
        let rule = match v.refund {
            Some(_) => record.channel.check_refund(v.max_claimable),
            None => record.channel.check_voucher(v.max_claimable, v.amount, deposit, now, &policy),
        };
        if v.dry_run {
            // Checked against the channel as it stands; nothing changes.
            let _ = reply.send(match rule {
                Ok(()) => SubmitOutcome::VoucherAccepted {
                    payer: v.config.payer,
                    channel: ChannelView::from(&record.channel),
                },
                Err(e) => voucher_rejected(v.config.payer, e, &record.channel),
            });
            return true;
        }
        match rule {
            Ok(()) => {
                let previous = Box::new(record.clone());
                match v.refund {
                    Some(amount) => record.refund_requested = Some(amount),
                    None => record.channel.accept(
                        x402_channel::SignedVoucher { max_claimable: v.max_claimable, signature: v.signature },
                        v.charge,
                    ),
                }
                record.updated_at_ms = now_ms;
                let outcome = SubmitOutcome::VoucherAccepted {
                    payer: v.config.payer,
                    channel: ChannelView::from(&record.channel),
                };
                let item = CommitItem::Channel {
                    record: Box::new(record.clone()),
                    previous,
                    shard: self.index,
                    outcome,
                    reply,
                };
                self.commit.send(item).is_ok()
            }
            Err(
                x402_channel::VoucherError::ChannelNotFound
                | x402_channel::VoucherError::CumulativeExceedsBalance { .. },
            ) if may_refresh && record.channel.synced_at.saturating_add(Self::CHANNEL_REFRESH.as_secs()) <= now => {
                let first = ParkedVoucher { merchant, verified: v.clone(), reply };
                self.fetch_channel(&v, first);
                true
            }
            Err(e) => {
                crate::metrics::rejected(crate::reason::Reason::from(e));
                let _ = reply.send(voucher_rejected(v.config.payer, e, &record.channel));
                true
            }
        }
    }

    /// Puts `first`'s deposit on chain; it and `then` (later requests of the
    /// channel) wait for it.
    fn start_deposit(&mut self, first: ParkedVoucher, then: Vec<ParkedVoucher>) {
        let id = first.verified.channel_id;
        tracing::debug!(shard = self.index, channel = %id, "voucher parked until its deposit lands");
        self.channel_source.deposit(&first.verified, self.deposit_notifier.clone());
        let mut queue = Vec::with_capacity(1 + then.len());
        queue.push(first);
        queue.extend(then);
        self.parked_vouchers_len += queue.len();
        self.parked_vouchers.insert(id, queue);
    }

    /// Checks parked vouchers in order; one carrying a deposit starts it,
    /// and it and the rest wait again. False when the committer is gone.
    fn resume_vouchers(&mut self, queue: Vec<ParkedVoucher>) -> bool {
        let mut queue = queue.into_iter();
        while let Some(parked) = queue.next() {
            // Queued before its channel was known to have a contract signer
            // (a voucher recovered while another's proof or read was out).
            if self.signed_by_contract_unproved(&parked.verified) {
                self.prove_voucher(parked, CONTRACT_SIGNER);
                continue;
            }
            if parked.verified.deposit.is_some() && !parked.verified.dry_run {
                if let Some(parked) = self.deposit_allowed(parked) {
                    self.start_deposit(parked, queue.collect());
                    return true;
                }
                continue;
            }
            if !self.check_voucher(parked.merchant, parked.verified, parked.reply, false) {
                return false;
            }
        }
        true
    }

    /// A deposit this shard started is on chain (or failed): the request
    /// that carried it and those behind it are checked against the new
    /// balance. False when the committer is gone.
    pub(super) fn deposited(&mut self, id: B256, result: Result<x402_channel::OnChain, DepositFailure>) -> bool {
        let Some(mut queue) = self.take_parked_vouchers(id) else { return true };
        match result {
            Ok(onchain) => {
                queue[0].verified.deposit = None;
                self.resume_synced(id, queue, onchain)
            }
            Err(DepositFailure::Rejected(message)) => {
                let first = queue.remove(0);
                crate::metrics::rejected(crate::reason::Reason::DepositFailed);
                let _ = first.reply.send(SubmitOutcome::VoucherRejected {
                    payer: Some(first.verified.config.payer),
                    rejection: Rejection::new(crate::reason::Reason::DepositFailed, message),
                    channel: self.channels.get(&id).map(|r| ChannelView::from(&r.channel)),
                });
                match queue.first() {
                    None => true,
                    Some(_) if self.channels.contains_key(&id) => self.resume_vouchers(queue),
                    Some(next) => {
                        let v = next.verified.clone();
                        let mut rest = queue.into_iter();
                        let next = rest.next().expect("not empty");
                        self.fetch_channel(&v, next);
                        match self.parked_vouchers.get_mut(&id) {
                            Some(parked) => {
                                self.parked_vouchers_len += rest.len();
                                parked.extend(rest);
                            }
                            // Too many wait already: `next` was answered so, and so are they.
                            None => {
                                for ParkedVoucher { reply, .. } in rest {
                                    let _ = reply.send(SubmitOutcome::Unavailable(
                                        "too many vouchers wait for channel reads".into(),
                                    ));
                                }
                            }
                        }
                        true
                    }
                }
            }
            Err(DepositFailure::Unavailable(e)) => {
                for ParkedVoucher { reply, .. } in queue {
                    let _ = reply.send(SubmitOutcome::Unavailable(format!(
                        "the deposit into channel {id} failed: {}",
                        e.for_clients()
                    )));
                }
                true
            }
        }
    }

    /// A channel's on-chain state arrived: its waiting vouchers are checked
    /// in arrival order. False when the committer is gone.
    pub(super) fn channel_fetched(&mut self, id: B256, fetched: ChannelFetched) -> bool {
        let Some(queue) = self.take_parked_vouchers(id) else { return true };
        let onchain = match fetched {
            Ok(onchain) => onchain,
            Err(ReadFailure::Unavailable(e)) => {
                for ParkedVoucher { reply, .. } in queue {
                    let _ = reply
                        .send(SubmitOutcome::Unavailable(format!("reading channel {id} failed: {}", e.for_clients())));
                }
                return true;
            }
            Err(ReadFailure::SignerHasCode(signer)) => {
                // A signer with code (an EIP-7702 delegated EOA whose
                // signature recovers) is asked by the contract, not
                // recovered: its vouchers are proved as a contract's are.
                // One already proved reads the channel again, which no
                // longer asks for code.
                for parked in queue {
                    if parked.verified.proved {
                        if !self.voucher(parked.merchant, parked.verified, parked.reply) {
                            return false;
                        }
                    } else {
                        self.prove_voucher(parked, &format!("its signer {signer} holds code, which decides"));
                    }
                }
                return true;
            }
        };
        self.resume_synced(id, queue, onchain)
    }

    /// Channel `id` as the chain has it now: recorded (a new record for the
    /// first of `queue` if the shard had none), then `queue` checked against
    /// it in order. False when the committer is gone.
    fn resume_synced(&mut self, id: B256, queue: Vec<ParkedVoucher>, onchain: x402_channel::OnChain) -> bool {
        let (first, now) = (&queue[0], self.clock.now_secs());
        self.channels
            .entry(id)
            .or_insert_with(|| new_record(&first.merchant, &first.verified, now))
            .channel
            .sync(onchain, now);
        self.resume_vouchers(queue)
    }
}

/// The answer to a voucher `e` refuses, with the channel as it stands so the
/// client can resynchronise.
fn voucher_rejected(payer: Address, e: x402_channel::VoucherError, channel: &x402_channel::Channel) -> SubmitOutcome {
    SubmitOutcome::VoucherRejected {
        payer: Some(payer),
        rejection: Rejection::new(crate::reason::Reason::from(e), e.to_string()),
        channel: Some(ChannelView::from(channel)),
    }
}
