//! The messages between the pipeline's stages: what a payer shard is sent
//! ([`ShardMsg`]: payments and vouchers from the verifiers, answers of the
//! balance and channel sources, the committer's settlement news and
//! reverts) and what the committer is sent ([`CommitItem`]: records to
//! write, then answers to send once they are durable). Apart from both
//! stages, so that neither depends on the other's file.

use std::sync::Arc;

use alloy::primitives::{B256, U256};
use tokio::sync::oneshot;

use super::{IntentChange, MerchantWrite, SubmitOutcome, Transition};
use crate::{
    Result,
    balance::Fetched,
    channels::{ChannelFetched, ChannelView, ClaimOutcome, DepositFailure, VerifiedVoucher},
    domain::{BalanceKey, ChannelRecord, Merchant, PaymentId, PaymentRecord, PaymentStatus, PendingKey},
    verify::Verified,
};

/// Messages a shard handles.
#[allow(
    clippy::large_enum_variant,
    reason = "`Payment` is nearly every message; boxing it would cost an allocation per payment"
)]
pub(crate) enum ShardMsg {
    /// A payment that passed stage 1.
    Payment { merchant: Arc<Merchant>, verified: Verified, reply: oneshot::Sender<SubmitOutcome> },
    /// The commit that would have recorded `id` failed: forget it.
    Revert { id: PaymentId, reservation: BalanceKey, value: U256 },
    /// A payment's settlement status changed (durably), perhaps changing
    /// what its payer owes.
    Settled { id: PaymentId, status: PaymentStatus, reservation: Option<ReservationChange> },
    /// The balance source fetched a balance this shard asked for.
    Balance { key: BalanceKey, fetched: Fetched },
    /// The proof of a parked payment's signature (of `key`'s queue) that
    /// this shard asked for under `ticket`.
    Proved { key: BalanceKey, ticket: u64, proved: crate::signature::Proved },
    /// The proof of a voucher's signature this shard asked for under
    /// `ticket`.
    VoucherProved { ticket: u64, proved: crate::signature::Proved },
    /// A voucher that passed stage 1, for a channel this shard owns.
    Voucher { merchant: Arc<Merchant>, verified: VerifiedVoucher, reply: oneshot::Sender<SubmitOutcome> },
    /// A channel's on-chain state this shard asked for.
    ChannelFetched { id: B256, fetched: ChannelFetched },
    /// A deposit this shard started landed (the channel's state after it)
    /// or failed.
    Deposited { id: B256, result: Result<x402_channel::OnChain, DepositFailure> },
    /// A fresh read of a channel's on-chain state (and, after a claim, when
    /// it was claimed), to mirror and record.
    ChannelSync {
        id: B256,
        onchain: x402_channel::OnChain,
        claimed: Option<ClaimOutcome>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// An operator asks for a claim or a refund of a channel; answered with
    /// the channel (`None` if this shard does not know it) once recorded.
    ChannelRequest { id: B256, claim: bool, refund: Option<u128>, reply: oneshot::Sender<Result<Option<ChannelView>>> },
    /// The commit of a channel's new state failed: this was its state before.
    ChannelRevert { record: Box<ChannelRecord> },
    /// Finish: everything queued before this has been handled.
    Stop,
}

/// How a settlement transition changes a payer's reservations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReservationChange {
    /// Settled or given up: no longer owed.
    Release(BalanceKey, U256),
    /// A reorg undid its settlement: owed again.
    Reserve(BalanceKey, U256),
}

/// Work for the committer.
pub(crate) enum CommitItem {
    /// Record an accepted payment, queue it for settlement, then answer ACCEPTED.
    Payment { record: Box<PaymentRecord>, pending: PendingKey, shard: usize, reply: oneshot::Sender<SubmitOutcome> },
    /// Answer once everything queued before it is durable (a DUPLICATE).
    Reply { outcome: SubmitOutcome, reply: oneshot::Sender<SubmitOutcome> },
    /// Record a merchant.
    Merchant(MerchantWrite),
    /// Record settlement progress: transaction intents and payment state changes.
    Settlement { intents: Vec<IntentChange>, transitions: Vec<Transition>, reply: oneshot::Sender<Result<()>> },
    /// Record a channel's refreshed on-chain mirror.
    /// With `event`, a claim or refund went through: announced as a
    /// `CONFIRMED` event of the channel for the merchant numbered so.
    /// With `previous`, an operator's request: if the write fails, the
    /// shard gets `previous` back, as after a failed voucher, so that no
    /// request the caller was told failed is recorded by a later write. A
    /// sync has none: what the chain showed stays true when the write fails.
    ChannelWrite {
        record: Box<ChannelRecord>,
        event: Option<(u32, PaymentStatus)>,
        previous: Option<(Box<ChannelRecord>, usize)>,
        reply: ChannelReply,
    },
    /// The shard applied the revert of channel `id` a failed write sent
    /// it: its items from here on are built on the recorded state.
    ChannelReverted { id: B256 },
    /// Record a channel's new state (an accepted voucher), then answer
    /// `outcome`; if the write fails, the shard gets `previous` back.
    Channel {
        record: Box<ChannelRecord>,
        previous: Box<ChannelRecord>,
        shard: usize,
        outcome: SubmitOutcome,
        reply: oneshot::Sender<SubmitOutcome>,
    },
}

/// Who hears that a channel write is durable.
pub(crate) enum ChannelReply {
    /// The claims task, after mirroring a read.
    Synced(oneshot::Sender<Result<()>>),
    /// An operator's request, answered with the channel as recorded.
    Requested(oneshot::Sender<Result<Option<ChannelView>>>, ChannelView),
}

impl ChannelReply {
    pub(super) fn send(self, result: Result<()>) {
        match self {
            Self::Synced(reply) => {
                let _ = reply.send(result);
            }
            Self::Requested(reply, view) => {
                let _ = reply.send(result.map(|()| Some(view)));
            }
        }
    }
}
