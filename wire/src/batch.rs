//! The `batch-settlement` scheme's payloads: vouchers against a payment
//! channel, with an optional deposit or refund request.

use alloy::primitives::{Address, B256, Bytes, U256, aliases::U40};
use serde::{Deserialize, Serialize};
use x402_channel::ChannelConfig;

use crate::{FieldError, fields};

/// The `batch-settlement` fields of the requirements (x402 `extra`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelExtra {
    /// `extra.receiverAuthorizer`.
    pub receiver_authorizer: Address,
    /// `extra.withdrawDelay`, seconds.
    pub withdraw_delay: u64,
}

/// A voucher payment as a gateway submits it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VoucherPayload {
    /// The network the payer signed for.
    pub network: String,
    /// The channel's terms (`channelConfig`), which `channel_id` must be the digest of.
    pub config: ChannelConfig,
    /// The voucher's channel id, as the client computed it.
    pub channel_id: B256,
    /// The voucher's `maxClaimableAmount`: the cumulative total the receiver may claim, in atomic token units.
    pub max_claimable: u128,
    /// The voucher's EIP-712 signature by the payer authorizer (the payer when that is zero), as sent.
    pub signature: Bytes,
    /// What the request costs, at most the required amount; `None` charges
    /// the amount.
    pub charge: Option<u128>,
    /// The requirements' `batch-settlement` fields the channel must match.
    pub extra: ChannelExtra,
    /// A deposit made with this request.
    pub deposit: Option<DepositPayload>,
    /// A cooperative refund request of up to this much (`None` inside: all
    /// not charged); the voucher is then the charged total.
    pub refund: Option<Option<u128>>,
}

/// The payer's ERC-3009 `ReceiveWithAuthorization` of a deposit, made out
/// to the deposit collector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DepositPayload {
    /// The amount deposited (the authorization's `value`), in atomic token units.
    pub amount: u128,
    /// The authorization's `validAfter`, unix seconds.
    pub valid_after: u64,
    /// The authorization's `validBefore`, unix seconds: the deposit must land on chain before it.
    pub valid_before: u64,
    /// The deposit salt; the authorization's nonce is `keccak256(abi.encode(channelId, salt))`.
    pub salt: U256,
    /// The payer's signature of the `ReceiveWithAuthorization`, in the token's EIP-712 domain.
    pub signature: Bytes,
}

/// The JSON form of a [`ChannelConfig`], as the reference packages write
/// it: `#[serde(with = "ChannelConfigJson")]` on a `ChannelConfig` field.
#[derive(Serialize, Deserialize)]
#[serde(remote = "ChannelConfig", rename_all = "camelCase", expecting = "a channel config object")]
#[allow(non_snake_case, missing_debug_implementations)]
pub struct ChannelConfigJson {
    /// The payer: funds the channel and takes back what is unclaimed after a withdrawal.
    #[serde(with = "fields::address")]
    pub payer: Address,
    /// `payerAuthorizer`: the EOA that signs vouchers; zero means the payer signs (ERC-1271).
    #[serde(rename = "payerAuthorizer", with = "fields::address")]
    pub payerAuthorizer: Address,
    /// The receiver, to whom claimed funds are settled (the requirements' `payTo`).
    #[serde(with = "fields::address")]
    pub receiver: Address,
    /// `receiverAuthorizer`: signs claim batches and refunds; must equal the requirements' `extra.receiverAuthorizer`.
    #[serde(rename = "receiverAuthorizer", with = "fields::address")]
    pub receiverAuthorizer: Address,
    /// The ERC-20 token the channel holds (the requirements' `asset`).
    #[serde(with = "fields::address")]
    pub token: Address,
    /// `withdrawDelay`: seconds from the payer's `initiateWithdraw` to its `finalizeWithdraw`; a JSON number.
    #[serde(rename = "withdrawDelay", with = "fields::uint40")]
    pub withdrawDelay: U40,
    /// A 32-byte word (0x-hex) that sets apart channels with otherwise equal terms.
    #[serde(with = "fields::word")]
    pub salt: B256,
}

/// The `type` of a payer's `batch-settlement` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ChannelPayloadType {
    /// A voucher against a channel with funds.
    Voucher,
    /// A voucher with a deposit that opens or tops up the channel.
    Deposit,
    /// A cooperative refund request (the voucher is the charged total).
    Refund,
}

/// A payer's `batch-settlement` payload (the `payload` of its
/// [`PaymentPayload`](crate::PaymentPayload)): `{type, channelConfig,
/// voucher}`, with `deposit` for a deposit and an optional `amount` for a
/// refund.
///
/// One struct rather than an enum tagged by `type`: serde loses the field
/// path inside internally tagged enums, and errors must name the field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelPayloadJson {
    /// The payload's `type`: `voucher`, `deposit` or `refund`.
    #[serde(rename = "type")]
    pub kind: ChannelPayloadType,
    /// `channelConfig`: the channel's terms, which the voucher's `channelId` must be the digest of.
    #[serde(with = "ChannelConfigJson")]
    pub channel_config: ChannelConfig,
    /// The payer's signed cumulative voucher.
    pub voucher: VoucherJson,
    /// The deposit, present when `type` is `deposit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deposit: Option<DepositJson>,
    /// A refund's amount (absent: everything not charged).
    #[serde(default, skip_serializing_if = "Option::is_none", with = "fields::opt_u128_decimal")]
    pub amount: Option<u128>,
}

/// A signed voucher: `{channelId, maxClaimableAmount, signature}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VoucherJson {
    /// `channelId`: the EIP-712 digest of the channel's config, 0x-hex.
    #[serde(with = "fields::word")]
    pub channel_id: B256,
    /// `maxClaimableAmount`: the cumulative total the receiver may claim, atomic token units as a decimal string.
    #[serde(with = "fields::u128_decimal")]
    pub max_claimable_amount: u128,
    /// The voucher's EIP-712 signature by the payer authorizer (the payer when that is zero), 0x-hex.
    #[serde(with = "fields::bytes")]
    pub signature: Bytes,
}

/// A deposit: `{amount, authorization: {erc3009Authorization: {validAfter,
/// validBefore, salt, signature}}}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DepositJson {
    /// The amount deposited, atomic token units as a decimal string.
    #[serde(with = "fields::u128_decimal")]
    pub amount: u128,
    /// How the deposit is collected: `{erc3009Authorization}`.
    pub authorization: DepositAuthorizationJson,
}

/// A deposit's authorization.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DepositAuthorizationJson {
    /// `erc3009Authorization`: the payer's `ReceiveWithAuthorization` to the deposit collector.
    pub erc3009_authorization: Erc3009AuthorizationJson,
}

/// The payer's ERC-3009 `ReceiveWithAuthorization` of a deposit (its
/// `from`, `to`, `value` and nonce follow from the channel).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Erc3009AuthorizationJson {
    /// `validAfter`, unix seconds as a decimal string.
    #[serde(with = "fields::u64_decimal")]
    pub valid_after: u64,
    /// `validBefore`, unix seconds as a decimal string: the deposit must land on chain before it.
    #[serde(with = "fields::u64_decimal")]
    pub valid_before: u64,
    /// The deposit salt (0x-hex of up to 32 bytes, or decimal); the ERC-3009 nonce is
    /// `keccak256(abi.encode(channelId, salt))`.
    #[serde(with = "fields::salt")]
    pub salt: U256,
    /// The payer's signature of the `ReceiveWithAuthorization`, 0x-hex.
    #[serde(with = "fields::bytes")]
    pub signature: Bytes,
}

impl ChannelPayloadJson {
    /// The voucher payment this payload makes on `network`, with the
    /// merchant's `extra` (what the gateway's requirements say, not what
    /// the client claims it accepted).
    pub fn into_voucher(self, network: String, extra: ChannelExtra) -> Result<VoucherPayload, FieldError> {
        let deposit = match (self.kind, self.deposit) {
            (ChannelPayloadType::Deposit, Some(d)) => {
                let a = d.authorization.erc3009_authorization;
                Some(DepositPayload {
                    amount: d.amount,
                    valid_after: a.valid_after,
                    valid_before: a.valid_before,
                    salt: a.salt,
                    signature: a.signature,
                })
            }
            (ChannelPayloadType::Deposit, None) => return Err(FieldError::new("", "missing field `deposit`")),
            _ => None,
        };
        Ok(VoucherPayload {
            network,
            config: self.channel_config,
            channel_id: self.voucher.channel_id,
            max_claimable: self.voucher.max_claimable_amount,
            signature: self.voucher.signature,
            charge: None,
            extra,
            deposit,
            refund: (self.kind == ChannelPayloadType::Refund).then_some(self.amount),
        })
    }
}

/// A resource server's `claim` payload to the facilitator: vouchers to
/// claim, optionally authorized by the server's own claim signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimPayloadJson {
    /// The vouchers to claim, the rows of one `claimWithSignature`.
    pub claims: Vec<ClaimJson>,
    /// `claimAuthorizerSignature`: the receiver authorizer's `ClaimBatch` signature of the
    /// rows, 0x-hex; absent, x402d signs with its own authorizer key if every channel names it.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "fields::opt_bytes")]
    pub claim_authorizer_signature: Option<Bytes>,
}

/// One claimed voucher: the channel, its voucher, and the total claimed
/// after this claim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimJson {
    /// The claimed voucher: its channel and `maxClaimableAmount`.
    pub voucher: ClaimVoucherJson,
    /// The voucher's signature by the payer authorizer (or the payer), 0x-hex.
    #[serde(with = "fields::bytes")]
    pub signature: Bytes,
    /// `totalClaimed`: the channel's claimed total after this claim (cumulative, not a delta),
    /// atomic token units as a decimal string.
    #[serde(with = "fields::u128_decimal")]
    pub total_claimed: u128,
}

/// A claimed voucher's channel and amount.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClaimVoucherJson {
    /// The channel's terms, in [`ChannelConfigJson`] form.
    #[serde(with = "ChannelConfigJson")]
    pub channel: ChannelConfig,
    /// `maxClaimableAmount` of the voucher, atomic token units as a decimal string.
    #[serde(with = "fields::u128_decimal")]
    pub max_claimable_amount: u128,
}

/// A resource server's `settle` payload: move what `receiver` has claimed
/// of `token` to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SettlePayloadJson {
    /// The receiver whose claimed funds move, 0x-hex.
    #[serde(with = "fields::address")]
    pub receiver: Address,
    /// The token contract whose claimed funds move, 0x-hex.
    #[serde(with = "fields::address")]
    pub token: Address,
}

/// A resource server's `refund` payload: its claims, then a cooperative
/// refund of `amount` to the payer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefundPayloadJson {
    /// `channelConfig`: the channel to refund from.
    #[serde(with = "ChannelConfigJson")]
    pub channel_config: ChannelConfig,
    /// The most to refund to the payer, atomic token units as a decimal string.
    #[serde(with = "fields::u128_decimal")]
    pub amount: u128,
    /// `refundNonce`: the channel's on-chain refund nonce, which the `Refund` signature covers; a decimal string.
    #[serde(with = "fields::decimal")]
    pub refund_nonce: U256,
    /// Claims landed in the same transaction before the refund, so the server's charges are not
    /// refunded (absent: none).
    #[serde(default)]
    pub claims: Vec<ClaimJson>,
    /// `refundAuthorizerSignature`: the receiver authorizer's `Refund` signature, 0x-hex;
    /// absent, x402d signs with its own authorizer key if the channel names it.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "fields::opt_bytes")]
    pub refund_authorizer_signature: Option<Bytes>,
    /// `claimAuthorizerSignature`: the `ClaimBatch` signature of `claims`, as in [`ClaimPayloadJson`].
    #[serde(default, skip_serializing_if = "Option::is_none", with = "fields::opt_bytes")]
    pub claim_authorizer_signature: Option<Bytes>,
}

/// The `type` of a resource server's `batch-settlement` payload to the
/// facilitator (`claim`, `settle`, `refund`, or a payer's `voucher`,
/// `deposit`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(expecting = "a payload object with a type")]
pub struct PayloadType {
    /// The payload's `type` (`claim`, `settle`, `refund`, `voucher` or `deposit`), read first to
    /// pick the payload's shape.
    #[serde(rename = "type")]
    pub kind: String,
}

/// A channel as it stands on chain, as a facilitator reports it (the
/// `extra` of `/verify`, `extra.channelState` of `/settle`) for the
/// reference server to mirror.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStateJson {
    /// The channel id.
    #[serde(with = "fields::word")]
    pub channel_id: B256,
    /// Its balance, atomic token units as a decimal string.
    #[serde(with = "fields::u128_decimal")]
    pub balance: u128,
    /// What the receiver has claimed so far, a decimal string.
    #[serde(with = "fields::u128_decimal")]
    pub total_claimed: u128,
    /// When the payer asked to withdraw (Unix seconds, a number); 0 when it
    /// has not.
    pub withdraw_requested_at: u64,
    /// The contract's refund nonce, a decimal string.
    #[serde(with = "fields::u64_decimal")]
    pub refund_nonce: u64,
}

/// The `extra` of a `/settle` answer for a channel: `{channelState}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChannelStateExtra {
    /// The channel after the settle.
    pub channel_state: ChannelStateJson,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deposit payload as the reference client writes it.
    fn deposit_json() -> serde_json::Value {
        serde_json::json!({
            "type": "deposit",
            "channelConfig": {
                "payer": "0x0101010101010101010101010101010101010101",
                "payerAuthorizer": "0x0101010101010101010101010101010101010101",
                "receiver": "0x0202020202020202020202020202020202020202",
                "receiverAuthorizer": "0x0303030303030303030303030303030303030303",
                "token": "0x0404040404040404040404040404040404040404",
                "withdrawDelay": 900,
                "salt": format!("{}", B256::ZERO),
            },
            "voucher": {
                "channelId": format!("{}", B256::repeat_byte(9)),
                "maxClaimableAmount": "5000",
                "signature": format!("0x{}", "11".repeat(65)),
            },
            "deposit": {
                "amount": "100000",
                "authorization": { "erc3009Authorization": {
                    "validAfter": "0", "validBefore": "1700000000",
                    "salt": format!("{}", B256::with_last_byte(0xff)),
                    "signature": format!("0x{}", "22".repeat(65)),
                }},
            },
        })
    }

    #[test]
    fn a_reference_deposit_payload_reads_and_writes_the_same_json() {
        let payload: ChannelPayloadJson = crate::from_value(deposit_json()).unwrap();
        assert_eq!(payload.channel_config.withdrawDelay, U40::from(900));
        assert_eq!(serde_json::to_value(&payload).unwrap(), deposit_json());
        let extra = ChannelExtra { receiver_authorizer: Address::repeat_byte(3), withdraw_delay: 900 };
        let v = payload.into_voucher("eip155:31337".into(), extra).unwrap();
        let d = v.deposit.unwrap();
        assert_eq!(
            (v.max_claimable, d.amount, d.valid_before, d.salt),
            (5000, 100_000, 1_700_000_000, U256::from(255))
        );
        assert_eq!(v.refund, None);
    }

    #[test]
    fn salts_and_delays_take_what_the_reference_writes_and_no_more() {
        let mut json = deposit_json();
        json["deposit"]["authorization"]["erc3009Authorization"]["salt"] = "255".into();
        let payload: ChannelPayloadJson = crate::from_value(json.clone()).unwrap();
        assert_eq!(payload.deposit.unwrap().authorization.erc3009_authorization.salt, U256::from(255));
        json["deposit"]["authorization"]["erc3009Authorization"]["salt"] = format!("0x{}", "ab".repeat(33)).into();
        let err = crate::from_value::<ChannelPayloadJson>(json.clone()).unwrap_err();
        assert_eq!(err, FieldError::new("deposit.authorization.erc3009Authorization.salt", "is longer than 32 bytes"));
        json["channelConfig"]["withdrawDelay"] = (1u64 << 40).into();
        let err = crate::from_value::<ChannelPayloadJson>(json).unwrap_err();
        assert_eq!(err, FieldError::new("channelConfig.withdrawDelay", "does not fit a uint40"));
    }
}
