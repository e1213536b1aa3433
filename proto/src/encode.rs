//! The x402 wire types ([`x402_wire`]) as gRPC messages: what a Rust
//! gateway, the load generator and the tests send. The server's decoding
//! (with its checks and field-named errors) is the engine's.

#![warn(unreachable_pub)]

use x402_wire::{Authorization, ExactPayload, Requirements, VoucherPayload};

use crate::v1 as pb;

impl From<&Authorization> for pb::ExactAuthorization {
    fn from(a: &Authorization) -> Self {
        Self {
            from: a.from.to_vec(),
            to: a.to.to_vec(),
            value: a.value.to_string(),
            valid_after: a.valid_after_secs(),
            valid_before: a.valid_before_secs(),
            nonce: a.nonce.to_vec(),
        }
    }
}

impl From<&ExactPayload> for pb::ExactPayment {
    fn from(p: &ExactPayload) -> Self {
        Self {
            network: p.network.clone(),
            authorization: Some((&p.authorization).into()),
            signature: p.signature.clone(),
        }
    }
}

impl From<&VoucherPayload> for pb::VoucherPayment {
    fn from(v: &VoucherPayload) -> Self {
        Self {
            network: v.network.clone(),
            channel_config: Some(pb::ChannelConfig {
                payer: v.config.payer.to_vec(),
                payer_authorizer: v.config.payerAuthorizer.to_vec(),
                receiver: v.config.receiver.to_vec(),
                receiver_authorizer: v.config.receiverAuthorizer.to_vec(),
                token: v.config.token.to_vec(),
                withdraw_delay: v.config.withdrawDelay.to::<u64>(),
                salt: v.config.salt.to_vec(),
            }),
            voucher: Some(pb::SignedVoucher {
                channel_id: v.channel_id.to_vec(),
                max_claimable_amount: v.max_claimable.to_string(),
                signature: v.signature.to_vec(),
            }),
            charge: v.charge.map(|c| c.to_string()).unwrap_or_default(),
            deposit: v.deposit.as_ref().map(|d| pb::ChannelDeposit {
                amount: d.amount.to_string(),
                valid_after: d.valid_after,
                valid_before: d.valid_before,
                salt: d.salt.to_string(),
                signature: d.signature.to_vec(),
            }),
            refund: v
                .refund
                .map(|amount| pb::ChannelRefund { amount: amount.map(|a| a.to_string()).unwrap_or_default() }),
        }
    }
}

/// The requirements of a submit; a voucher's also carry its
/// `batch-settlement` fields.
pub fn requirements(r: &Requirements, voucher: Option<&VoucherPayload>) -> pb::PaymentRequirements {
    let (receiver_authorizer, withdraw_delay) =
        voucher.map_or((Vec::new(), 0), |v| (v.extra.receiver_authorizer.to_vec(), v.extra.withdraw_delay));
    pb::PaymentRequirements {
        scheme: r.scheme.clone(),
        network: r.network.clone(),
        amount: r.amount.to_string(),
        asset: r.asset.to_vec(),
        pay_to: r.pay_to.to_vec(),
        max_timeout_seconds: r.max_timeout_seconds,
        eip712_name: r.eip712_name.clone(),
        eip712_version: r.eip712_version.clone(),
        receiver_authorizer,
        withdraw_delay,
    }
}

/// A submit of an `exact` payment.
pub fn exact_request(request_id: u64, r: &Requirements, payment: &ExactPayload) -> pb::SubmitRequest {
    pb::SubmitRequest {
        request_id,
        requirements: Some(requirements(r, None)),
        payment: Some(pb::submit_request::Payment::Exact(payment.into())),
        idempotency_key: String::new(),
    }
}

/// A submit of a `batch-settlement` voucher.
pub fn voucher_request(request_id: u64, r: &Requirements, voucher: &VoucherPayload) -> pb::SubmitRequest {
    pb::SubmitRequest {
        request_id,
        requirements: Some(requirements(r, Some(voucher))),
        payment: Some(pb::submit_request::Payment::Voucher(Box::new(voucher.into()))),
        idempotency_key: String::new(),
    }
}

/// A submit of a raw `PAYMENT-SIGNATURE` header (decoded by the server).
pub fn header_request(request_id: u64, r: &Requirements, header: String) -> pb::SubmitRequest {
    pb::SubmitRequest {
        request_id,
        requirements: Some(requirements(r, None)),
        payment: Some(pb::submit_request::Payment::PaymentSignatureHeader(header)),
        idempotency_key: String::new(),
    }
}
