//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`; always
//! in the engine's unit tests, which run the committed seeds through them).
//! Each takes outside bytes through a decoder the engine runs in
//! production and checks what must hold of every input: no panic; an input
//! ends accepted, rejected with a reason and a message, or invalid with the
//! field named; and an accepted `exact` payment's digest, recomputed here
//! from its fields, recovers to its `from`.

use alloy::primitives::Signature;
use prost::Message;
use x402_chain::{Eip3009Domain, TransferWithAuthorization};
use x402_proto::v1 as pb;

use crate::{
    channels::{ChannelContracts, VoucherVerifier},
    domain::PaymentInput,
    reason::Refusal,
    testing::direct_merchant,
    verify::{MinValidity, Verifier},
};

/// The time the fuzz targets verify at (unix seconds); the seeds are valid
/// around it.
pub const NOW: u64 = 1_800_000_000;

/// A `SubmitRequest` (protobuf, as a gateway streams it) through the proto
/// → domain conversion and stage 1's checks.
pub fn submit_request(data: &[u8]) {
    let Ok(request) = pb::SubmitRequest::decode(data) else { return };
    let submission = match crate::grpc::convert::submission(request) {
        Ok(submission) => submission,
        Err(invalid) => return assert_named(&invalid.field, &invalid.message),
    };
    let merchant = direct_merchant(submission.requirements.pay_to);
    if let PaymentInput::Voucher(payload) = submission.input {
        let mut vouchers = VoucherVerifier::new(ChannelContracts::default());
        match vouchers.verify(&merchant, &submission.requirements, *payload) {
            Ok(verified) => assert_ne!(verified.channel_id, alloy::primitives::B256::ZERO),
            Err(refusal) => assert_refused(&refusal),
        }
        return;
    }
    let requirements = submission.requirements.clone();
    match Verifier::new(MinValidity::default()).verify(&merchant, submission, NOW) {
        Ok(verified) => {
            // Recomputed here, not with the verifier's own code.
            let chain_id = verified.chain_id;
            let domain = Eip3009Domain::new(
                &requirements.eip712_name,
                &requirements.eip712_version,
                chain_id,
                requirements.asset,
            );
            let auth = &verified.payload.authorization;
            let digest = domain.signing_hash(&TransferWithAuthorization::from(auth));
            assert_eq!(digest, verified.digest, "the digest of the fields signed");
            // Stage 1 says whether the signature recovers to `from`; any
            // other is left to the chain (a payer with code), and no
            // ERC-6492 factory is allowed here.
            let recovers = Signature::try_from(verified.payload.signature.as_slice())
                .ok()
                .and_then(|signature| signature.recover_address_from_prehash(&digest).ok())
                .is_some_and(|signer| signer == auth.from);
            match &verified.signature {
                crate::verify::SignatureCheck::Recovered => {
                    assert!(recovers, "a recovered payment is signed by its from")
                }
                crate::verify::SignatureCheck::NotRecovered(_) => assert!(
                    crate::verify::check_signature(&verified.payload.signature, digest, auth.from).is_err(),
                    "a signature of its from was left to the chain"
                ),
                crate::verify::SignatureCheck::Counterfactual(_) => panic!("no ERC-6492 factory is allowed here"),
            }
        }
        Err(refusal) => assert_refused(&refusal),
    }
}

/// The admin and channel requests through their proto → domain conversion.
pub fn admin_request(data: &[u8]) {
    let Some((&kind, body)) = data.split_first() else { return };
    match kind % 3 {
        0 => {
            if let Ok(request) = pb::UpsertMerchantRequest::decode(body) {
                match crate::grpc::convert::merchant_update(request) {
                    Ok(update) => assert!(!update.id.is_empty()),
                    Err(invalid) => assert_named(&invalid.field, &invalid.message),
                }
            }
        }
        1 => {
            if let Ok(request) = pb::RefundChannelRequest::decode(body) {
                let amount = (!request.amount.is_empty()).then_some(request.amount.as_str());
                if let Err(invalid) = crate::grpc::convert::channel_request(&request.channel_id, amount) {
                    assert_named(&invalid.field, &invalid.message);
                }
            }
        }
        _ => {
            if let Ok(request) = pb::ClaimChannelRequest::decode(body)
                && let Err(invalid) = crate::grpc::convert::channel_request(&request.channel_id, None)
            {
                assert_named(&invalid.field, &invalid.message);
            }
        }
    }
}

/// A ledger record of the table the first byte names, decoded from the
/// rest: refused with an error, or decoded into a record that encodes and
/// decodes back to itself.
pub fn ledger_record(data: &[u8]) {
    use crate::ledger::records as r;
    let Some((&table, bytes)) = data.split_first() else { return };
    match table % 6 {
        0 => round_trip(bytes, r::decode_payment, r::encode_payment),
        1 => round_trip(bytes, r::decode_merchant, r::encode_merchant),
        2 => round_trip(bytes, |b| r::decode_event(7, b), r::encode_event),
        3 => round_trip(bytes, r::decode_intent, r::encode_intent),
        4 => round_trip(bytes, r::decode_channel, r::encode_channel),
        _ => {
            if let Ok(key) = r::decode_pending_key(bytes) {
                assert_eq!(r::decode_pending_key(&r::pending_key(&key)).expect("reads back"), key);
            }
        }
    }
}

fn round_trip<T: PartialEq + std::fmt::Debug>(
    bytes: &[u8],
    decode: impl Fn(&[u8]) -> crate::Result<T>,
    encode: impl Fn(&T) -> Vec<u8>,
) {
    match decode(bytes) {
        Ok(record) => assert_eq!(decode(&encode(&record)).expect("what is written reads back"), record),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fn assert_named(field: &str, message: &str) {
    assert!(!field.is_empty() && !message.is_empty(), "an invalid input names its field: {field:?} {message:?}");
}

fn assert_refused(refusal: &Refusal) {
    match refusal {
        Refusal::Rejected { rejection, .. } => {
            assert!(!rejection.message.is_empty() && !rejection.reason.code().is_empty());
        }
        Refusal::Invalid(invalid) => assert_named(&invalid.field, &invalid.message),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use alloy::primitives::{B256, address};
    use x402_devnet::Payer;

    use super::*;

    fn corpus(target: &str) -> Vec<Vec<u8>> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
        std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| std::fs::read(entry.unwrap().path()).unwrap())
            .collect()
    }

    /// The signed payment the `submit_request` seeds hold.
    fn seed_request(payer: &Payer, nonce: u8) -> pb::SubmitRequest {
        let requirements = x402_devnet::dev_requirements(
            address!("0x70997970C51812dc3A010C7d01b50e0d17dc79C8"),
            x402_devnet::DEV_TOKEN_ADDRESS,
            10_000,
        );
        let payload = payer.sign_exact(&requirements, NOW - 600, NOW + 600, B256::repeat_byte(nonce));
        crate::grpc::submit_request(1, &crate::domain::Submission::new(requirements, PaymentInput::Exact(payload)))
    }

    /// The committed seeds run through the targets, and the accepted one is
    /// accepted: the invariant on accepted payments is reached.
    #[test]
    fn the_seeds_run_through_the_targets() {
        let seeds = corpus("submit_request");
        assert!(!seeds.is_empty());
        seeds.iter().for_each(|s| submit_request(s));
        let payer = Payer::new(alloy::signers::local::PrivateKeySigner::from_bytes(&B256::repeat_byte(0x11)).unwrap());
        let accepted = seed_request(&payer, 1).encode_to_vec();
        assert!(seeds.contains(&accepted), "the accepted seed is committed (regenerate: X402D_WRITE_SEEDS=1)");
        let submission = crate::grpc::convert::submission(pb::SubmitRequest::decode(&accepted[..]).unwrap()).unwrap();
        let to = submission.requirements.pay_to;
        assert!(Verifier::new(MinValidity::default()).verify(&direct_merchant(to), submission, NOW).is_ok());
        corpus("admin_request").iter().for_each(|s| admin_request(s));
        corpus("ledger_record").iter().for_each(|s| ledger_record(s));
    }

    /// Writes the seeds (`X402D_WRITE_SEEDS=1`): a signed payment, one
    /// with a broken signature, and a record of every table.
    #[test]
    fn write_seeds() {
        if std::env::var_os("X402D_WRITE_SEEDS").is_none() {
            return;
        }
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let write = |target: &str, name: &str, bytes: Vec<u8>| {
            std::fs::create_dir_all(dir.join(target)).unwrap();
            std::fs::write(dir.join(target).join(name), bytes).unwrap();
        };
        let payer = Payer::new(alloy::signers::local::PrivateKeySigner::from_bytes(&B256::repeat_byte(0x11)).unwrap());
        write("submit_request", "accepted.bin", seed_request(&payer, 1).encode_to_vec());
        let mut forged = seed_request(&payer, 2);
        if let Some(pb::submit_request::Payment::Exact(exact)) = forged.payment.as_mut() {
            exact.signature[10] ^= 1;
        }
        write("submit_request", "forged.bin", forged.encode_to_vec());
        let upsert = pb::UpsertMerchantRequest {
            merchant: Some(pb::Merchant { id: "m1".into(), pay_to: vec![vec![7u8; 20]], ..Default::default() }),
            api_key: "a-merchant-key-0123456789".into(),
        };
        write("admin_request", "upsert.bin", [&[0u8][..], &upsert.encode_to_vec()].concat());
        let refund = pb::RefundChannelRequest { channel_id: vec![1u8; 32], amount: "1000".into() };
        write("admin_request", "refund.bin", [&[1u8][..], &refund.encode_to_vec()].concat());
        use crate::ledger::{conformance, records as r};
        let payment = conformance::sample_payment(1, 1);
        write("ledger_record", "payment.bin", [&[0u8][..], &r::encode_payment(&payment)].concat());
        let event = crate::domain::SettlementEvent {
            sequence: 7,
            merchant_number: 1,
            payment_id: payment.id,
            status: payment.status.clone(),
            channel: None,
        };
        write("ledger_record", "event.bin", [&[2u8][..], &r::encode_event(&event)].concat());
        let key = crate::domain::PendingKey { merchant_number: 1, deadline: NOW, id: payment.id };
        write("ledger_record", "pending.bin", [&[5u8][..], &r::pending_key(&key)[..]].concat());
    }
}
