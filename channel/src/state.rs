//! The server's view of one channel: what it has charged, the highest voucher
//! the payer signed, and its mirror of the contract's state; the voucher
//! rules and what a claim may take.

use alloy::primitives::{B256, Bytes};

use crate::{ChannelConfig, ClaimEntry};

/// The contract's state of a channel, as last read from the chain.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OnChain {
    /// Deposited and not withdrawn or refunded; bounds every voucher.
    pub balance: u128,
    /// Claimed by the receiver so far (cumulative).
    pub total_claimed: u128,
    /// The payer's pending exit, if one was initiated.
    pub withdrawal: Option<Withdrawal>,
    /// The nonce the next signed refund must carry.
    pub refund_nonce: u64,
}

impl OnChain {
    /// What a withdrawal or a refund could still return to the payer.
    pub const fn unclaimed(&self) -> u128 {
        self.balance.saturating_sub(self.total_claimed)
    }
}

/// A withdrawal the payer initiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Withdrawal {
    /// The amount requested.
    pub amount: u128,
    /// Unix time from which the payer may finalize it; vouchers not claimed
    /// by then are lost to the receiver.
    pub finalize_after: u64,
}

/// A voucher with the payer's signature.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SignedVoucher {
    /// The cumulative ceiling the receiver may claim.
    pub max_claimable: u128,
    /// 65-byte signature of the payer's authorizer.
    pub signature: Bytes,
}

/// Why a voucher is refused. Each maps to an x402 reason code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VoucherError {
    /// The channel has no balance: never funded, or drained.
    #[error("channel has no balance")]
    ChannelNotFound,
    /// The voucher is not the charged total plus this request's amount.
    #[error("voucher must be charged {charged} + amount {amount} = {expected}, got {got}")]
    CumulativeAmountMismatch {
        /// The channel's charged total.
        charged: u128,
        /// The amount of this request.
        amount: u128,
        /// `charged + amount`.
        expected: u128,
        /// The voucher's `maxClaimableAmount`.
        got: u128,
    },
    /// The voucher exceeds what the channel holds.
    #[error("voucher {got} exceeds the channel balance {balance}")]
    CumulativeExceedsBalance {
        /// Balance, including a deposit made with this request.
        balance: u128,
        /// The voucher's `maxClaimableAmount`.
        got: u128,
    },
    /// The voucher is not above what the chain shows claimed.
    #[error("voucher {got} is not above the claimed total {claimed}")]
    CumulativeBelowClaimed {
        /// The on-chain claimed total.
        claimed: u128,
        /// The voucher's `maxClaimableAmount`.
        got: u128,
    },
    /// The payer's withdrawal is about to be finalized: a voucher accepted
    /// now might not be claimed in time.
    #[error("withdrawal can be finalized at {finalize_after}")]
    WithdrawalClosing {
        /// Unix time from which the payer may finalize.
        finalize_after: u64,
    },
}

impl VoucherError {
    /// The x402 reason code.
    pub const fn reason(&self) -> &'static str {
        match self {
            Self::ChannelNotFound => "invalid_batch_settlement_evm_channel_not_found",
            Self::CumulativeAmountMismatch { .. } => "invalid_batch_settlement_evm_cumulative_amount_mismatch",
            Self::CumulativeExceedsBalance { .. } => "invalid_batch_settlement_evm_cumulative_exceeds_balance",
            Self::CumulativeBelowClaimed { .. } => "invalid_batch_settlement_evm_cumulative_below_claimed",
            Self::WithdrawalClosing { .. } => "invalid_batch_settlement_evm_withdrawal_pending",
        }
    }
}

/// When claims go out for a merchant's channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimPolicy {
    /// Claim whatever is unclaimed at least this often (seconds).
    pub interval_secs: u64,
    /// Claim as soon as a channel's unclaimed value reaches this.
    pub threshold: u128,
    /// Stop accepting vouchers this many seconds before a pending withdrawal
    /// can be finalized, and claim well before then.
    pub withdrawal_margin_secs: u64,
}

impl Default for ClaimPolicy {
    fn default() -> Self {
        Self { interval_secs: 3600, threshold: u128::MAX, withdrawal_margin_secs: 300 }
    }
}

/// Why a channel's claim is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimReason {
    /// The payer initiated a withdrawal.
    Withdrawal,
    /// Unclaimed value reached the threshold.
    Threshold,
    /// The claim interval passed.
    Interval,
    /// Asked for (an operator's "claim now", a refund).
    Requested,
}

/// One channel as the server keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Channel {
    /// The channel's immutable terms.
    pub config: ChannelConfig,
    /// Its id (the config's EIP-712 digest).
    pub id: B256,
    /// The cumulative amount charged for served requests. Never decreases.
    pub charged: u128,
    /// The highest voucher the payer signed; it covers `charged`.
    pub voucher: Option<SignedVoucher>,
    /// The contract's state, as last read.
    pub onchain: OnChain,
    /// Unix time of the last read of `onchain`.
    pub synced_at: u64,
}

impl Channel {
    /// A channel known by its config, not yet read from the chain.
    pub const fn new(config: ChannelConfig, id: B256) -> Self {
        Self {
            config,
            id,
            charged: 0,
            voucher: None,
            onchain: OnChain { balance: 0, total_claimed: 0, withdrawal: None, refund_nonce: 0 },
            synced_at: 0,
        }
    }

    /// Checks a paid voucher for `amount` against the channel, `deposit`
    /// being the amount a deposit in the same request adds (0 if none).
    ///
    /// The rules of the scheme: the voucher is exactly `charged + amount`,
    /// within the balance, and above what the chain shows claimed; and, with
    /// a withdrawal pending, not too close to its finalization.
    pub fn check_voucher(
        &self,
        max_claimable: u128,
        amount: u128,
        deposit: u128,
        now: u64,
        policy: &ClaimPolicy,
    ) -> Result<(), VoucherError> {
        let balance = self.onchain.balance.saturating_add(deposit);
        if balance == 0 {
            return Err(VoucherError::ChannelNotFound);
        }
        let expected = self.charged.checked_add(amount);
        if expected != Some(max_claimable) {
            return Err(VoucherError::CumulativeAmountMismatch {
                charged: self.charged,
                amount,
                expected: expected.unwrap_or(u128::MAX),
                got: max_claimable,
            });
        }
        if max_claimable > balance {
            return Err(VoucherError::CumulativeExceedsBalance { balance, got: max_claimable });
        }
        if max_claimable <= self.onchain.total_claimed {
            return Err(VoucherError::CumulativeBelowClaimed {
                claimed: self.onchain.total_claimed,
                got: max_claimable,
            });
        }
        if let Some(w) = self.onchain.withdrawal
            && now.saturating_add(policy.withdrawal_margin_secs) >= w.finalize_after
        {
            return Err(VoucherError::WithdrawalClosing { finalize_after: w.finalize_after });
        }
        Ok(())
    }

    /// Checks a refund request's voucher: it charges nothing, so it must be
    /// exactly the charged total.
    pub const fn check_refund(&self, max_claimable: u128) -> Result<(), VoucherError> {
        if max_claimable == self.charged {
            return Ok(());
        }
        Err(VoucherError::CumulativeAmountMismatch {
            charged: self.charged,
            amount: 0,
            expected: self.charged,
            got: max_claimable,
        })
    }

    /// Records a voucher that passed [`check_voucher`](Self::check_voucher)
    /// and the request's actual charge, which may be below the voucher's
    /// amount (never above: the charged total stays within the voucher).
    ///
    /// # Panics
    /// If `charge` would take the charged total above the voucher.
    pub fn accept(&mut self, voucher: SignedVoucher, charge: u128) {
        let charged = self.charged + charge;
        assert!(charged <= voucher.max_claimable, "charge {charge} exceeds the voucher");
        self.charged = charged;
        if self.voucher.as_ref().is_none_or(|v| v.max_claimable < voucher.max_claimable) {
            self.voucher = Some(voucher);
        }
    }

    /// Takes in a fresh read of the contract. If the chain shows more claimed
    /// than this server charged (another holder of the receiver key
    /// claimed), the charged total follows it, so vouchers keep rising.
    pub fn sync(&mut self, onchain: OnChain, at: u64) {
        self.onchain = onchain;
        self.charged = self.charged.max(onchain.total_claimed);
        self.synced_at = at;
    }

    /// What a claim now would bring the channel's claimed total to: the
    /// charged total, bounded by the signed voucher and the balance. `None`
    /// when there is nothing above what is already claimed.
    pub fn claim_total(&self) -> Option<u128> {
        let voucher = self.voucher.as_ref()?;
        let total = self.charged.min(voucher.max_claimable).min(self.onchain.balance);
        (total > self.onchain.total_claimed).then_some(total)
    }

    /// The value a claim now would add.
    pub fn unclaimed(&self) -> u128 {
        self.claim_total().map_or(0, |t| t - self.onchain.total_claimed)
    }

    /// The row of a claim batch for this channel, if anything is claimable.
    pub fn claim_entry(&self) -> Option<(ClaimEntry, Bytes)> {
        let total = self.claim_total()?;
        let voucher = self.voucher.as_ref()?;
        Some((
            ClaimEntry { channelId: self.id, maxClaimableAmount: voucher.max_claimable, totalClaimed: total },
            voucher.signature.clone(),
        ))
    }

    /// Whether the channel should be claimed now, given when it was last
    /// claimed (`last_claim`, Unix seconds; 0 if never).
    pub fn claim_due(&self, policy: &ClaimPolicy, now: u64, last_claim: u64) -> Option<ClaimReason> {
        let unclaimed = self.unclaimed();
        if unclaimed == 0 {
            return None;
        }
        if self.onchain.withdrawal.is_some() {
            return Some(ClaimReason::Withdrawal);
        }
        if unclaimed >= policy.threshold {
            return Some(ClaimReason::Threshold);
        }
        (now.saturating_sub(last_claim) >= policy.interval_secs).then_some(ClaimReason::Interval)
    }

    /// What a cooperative refund may return now: the balance not covered by
    /// charges, up to `requested` (everything if `None`).
    pub fn refundable(&self, requested: Option<u128>) -> u128 {
        let free = self.onchain.balance.saturating_sub(self.charged.max(self.onchain.total_claimed));
        requested.map_or(free, |r| r.min(free))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloy::primitives::{Address, aliases::U40};
    use proptest::prelude::*;

    const POLICY: ClaimPolicy = ClaimPolicy { interval_secs: 60, threshold: 1_000, withdrawal_margin_secs: 100 };

    fn channel(balance: u128) -> Channel {
        let config = ChannelConfig {
            payer: Address::repeat_byte(1),
            payerAuthorizer: Address::repeat_byte(1),
            receiver: Address::repeat_byte(2),
            receiverAuthorizer: Address::repeat_byte(3),
            token: Address::repeat_byte(4),
            withdrawDelay: U40::from(900),
            salt: B256::ZERO,
        };
        let mut c = Channel::new(config, B256::repeat_byte(9));
        c.sync(OnChain { balance, ..OnChain::default() }, 1);
        c
    }

    fn voucher(max: u128) -> SignedVoucher {
        SignedVoucher { max_claimable: max, signature: Bytes::from(vec![7; 65]) }
    }

    #[test]
    fn vouchers_must_equal_charged_plus_amount() {
        let mut c = channel(1_000);
        assert_eq!(c.check_voucher(100, 100, 0, 0, &POLICY), Ok(()));
        c.accept(voucher(100), 40);
        assert_eq!(c.charged, 40);
        let err = c.check_voucher(200, 100, 0, 0, &POLICY).unwrap_err();
        assert_eq!(err, VoucherError::CumulativeAmountMismatch { charged: 40, amount: 100, expected: 140, got: 200 });
        assert_eq!(err.reason(), "invalid_batch_settlement_evm_cumulative_amount_mismatch");
        assert_eq!(c.check_voucher(140, 100, 0, 0, &POLICY), Ok(()));
    }

    #[test]
    fn a_refund_voucher_is_the_charged_total() {
        let mut c = channel(1_000);
        c.accept(voucher(100), 70);
        assert_eq!(c.check_refund(70), Ok(()));
        assert_eq!(
            c.check_refund(100),
            Err(VoucherError::CumulativeAmountMismatch { charged: 70, amount: 0, expected: 70, got: 100 })
        );
    }

    #[test]
    fn vouchers_are_bounded_by_balance_and_claimed_total() {
        let mut c = channel(0);
        assert_eq!(c.check_voucher(10, 10, 0, 0, &POLICY), Err(VoucherError::ChannelNotFound));
        assert_eq!(c.check_voucher(10, 10, 50, 0, &POLICY), Ok(()), "a deposit in the request counts");
        c.sync(OnChain { balance: 50, ..OnChain::default() }, 2);
        assert_eq!(
            c.check_voucher(60, 60, 0, 0, &POLICY),
            Err(VoucherError::CumulativeExceedsBalance { balance: 50, got: 60 })
        );
        // Claimed on chain above this server's charges: charged follows.
        c.sync(OnChain { balance: 50, total_claimed: 30, ..OnChain::default() }, 3);
        assert_eq!(c.charged, 30);
        assert_eq!(c.check_voucher(40, 10, 0, 0, &POLICY), Ok(()));
        // A drained channel (withdrawal finalized) refuses every voucher.
        c.sync(OnChain { balance: 30, total_claimed: 30, ..OnChain::default() }, 4);
        assert!(matches!(c.check_voucher(40, 10, 0, 0, &POLICY), Err(VoucherError::CumulativeExceedsBalance { .. })));
    }

    #[test]
    fn a_pending_withdrawal_makes_the_claim_due_and_closes_near_its_end() {
        let mut c = channel(1_000);
        c.accept(voucher(100), 100);
        assert_eq!(c.claim_due(&POLICY, 10, 0), None, "below threshold, within interval");
        assert_eq!(c.claim_due(&POLICY, 60, 0), Some(ClaimReason::Interval));
        c.sync(
            OnChain {
                balance: 1_000,
                withdrawal: Some(Withdrawal { amount: 1_000, finalize_after: 900 }),
                ..c.onchain
            },
            5,
        );
        assert_eq!(c.claim_due(&POLICY, 10, 0), Some(ClaimReason::Withdrawal));
        assert_eq!(c.check_voucher(110, 10, 0, 799, &POLICY), Ok(()));
        assert_eq!(
            c.check_voucher(110, 10, 0, 800, &POLICY),
            Err(VoucherError::WithdrawalClosing { finalize_after: 900 })
        );
    }

    #[test]
    fn claims_take_the_charged_total_under_the_voucher() {
        let mut c = channel(1_000);
        assert_eq!(c.claim_entry(), None);
        c.accept(voucher(100), 60);
        c.accept(voucher(160), 10);
        let (entry, signature) = c.claim_entry().unwrap();
        assert_eq!((entry.maxClaimableAmount, entry.totalClaimed), (160, 70));
        assert_eq!(signature.len(), 65);
        c.sync(OnChain { balance: 1_000, total_claimed: 70, ..OnChain::default() }, 6);
        assert_eq!(c.claim_entry(), None, "claimed: nothing left");
        assert_eq!(c.claim_due(&POLICY, 10_000, 0), None);
        assert_eq!(c.refundable(None), 930);
        assert_eq!(c.refundable(Some(100)), 100);
    }

    /// A request against the channel, or a chain event.
    #[derive(Clone, Debug)]
    enum Op {
        /// A paid request: the voucher's amount, the actual charge's share of
        /// it (per mille) and whether the client signs the right cumulative.
        Pay { amount: u128, charge_permille: u128, honest: bool },
        /// A deposit lands.
        Deposit(u128),
        /// The claim this channel offers is mined.
        Claim,
        /// A refund of the free balance.
        Refund(u128),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (1u128..500, 0u128..=1000, prop::bool::weighted(0.8))
                .prop_map(|(amount, charge_permille, honest)| Op::Pay { amount, charge_permille, honest }),
            1 => (1u128..2_000).prop_map(Op::Deposit),
            2 => Just(Op::Claim),
            1 => (0u128..1_000).prop_map(Op::Refund),
        ]
    }

    proptest! {
        /// Whatever the order of requests and chain events: the charged total
        /// only rises, it stays within the highest signed voucher, claims
        /// never exceed the signed voucher or the balance, and the claimed
        /// total never passes the charged one.
        #[test]
        fn charged_is_monotonic_and_claims_stay_within_voucher_and_balance(
            ops in prop::collection::vec(op(), 1..80)
        ) {
            let mut c = channel(1_000);
            for op in ops {
                let before = c.clone();
                match op {
                    Op::Pay { amount, charge_permille, honest } => {
                        let max = if honest { c.charged + amount } else { c.charged + amount + 1 };
                        match c.check_voucher(max, amount, 0, 0, &POLICY) {
                            Ok(()) => {
                                prop_assert!(honest);
                                prop_assert!(max <= c.onchain.balance);
                                c.accept(voucher(max), amount * charge_permille / 1000);
                            }
                            Err(VoucherError::CumulativeAmountMismatch { expected, .. }) => {
                                prop_assert!(!honest);
                                prop_assert_eq!(expected, c.charged + amount);
                            }
                            Err(e) => {
                                let expected = matches!(
                                    e,
                                    VoucherError::ChannelNotFound
                                        | VoucherError::CumulativeExceedsBalance { .. }
                                        | VoucherError::CumulativeBelowClaimed { .. }
                                );
                                prop_assert!(expected, "unexpected {:?}", e);
                            }
                        }
                    }
                    Op::Deposit(amount) => {
                        c.sync(OnChain { balance: c.onchain.balance + amount, ..c.onchain }, 1);
                    }
                    Op::Claim => {
                        if let Some((entry, _)) = c.claim_entry() {
                            prop_assert!(entry.totalClaimed <= entry.maxClaimableAmount);
                            prop_assert!(entry.totalClaimed <= c.onchain.balance);
                            prop_assert!(entry.totalClaimed > c.onchain.total_claimed);
                            c.sync(OnChain { total_claimed: entry.totalClaimed, ..c.onchain }, 1);
                        }
                    }
                    Op::Refund(amount) => {
                        let refunded = c.refundable(Some(amount));
                        prop_assert!(refunded <= amount);
                        prop_assert!(c.onchain.balance - refunded >= c.charged);
                        c.sync(OnChain { balance: c.onchain.balance - refunded, ..c.onchain }, 1);
                    }
                }
                prop_assert!(c.charged >= before.charged);
                prop_assert!(c.onchain.total_claimed <= c.charged);
                if let Some(v) = &c.voucher {
                    prop_assert!(c.charged <= v.max_claimable);
                    prop_assert!(before.voucher.as_ref().is_none_or(|b| b.max_claimable <= v.max_claimable));
                }
            }
        }
    }
}
