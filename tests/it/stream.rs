//! 10,000 payments from 50 payers over one `SubmitStream`, their replays,
//! tampered copies, and a restart on the same data directory.

use alloy::primitives::Address;
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet::Payer;

const PAYERS: usize = 50;
const PER_PAYER: usize = 200;

/// Each tamper of a valid payment and the reason it must get.
fn tampered(original: &pb::SubmitRequest, request_id: u64) -> Vec<(pb::SubmitRequest, &'static str)> {
    let mut out = Vec::new();
    let mut add = |f: &dyn Fn(&mut pb::SubmitRequest), reason: &'static str| {
        let mut req = original.clone();
        req.request_id = request_id + out.len() as u64;
        f(&mut req);
        out.push((req, reason));
    };
    // The signed value, raised in both the authorization and the price.
    add(
        &|r| {
            let a = exact_mut(r).authorization.as_mut().unwrap();
            a.value = (AMOUNT + 1).to_string();
            r.requirements.as_mut().unwrap().amount = (AMOUNT + 1).to_string();
        },
        "invalid_exact_evm_signature",
    );
    // The price alone: the signature holds, the value does not match.
    add(
        &|r| r.requirements.as_mut().unwrap().amount = (AMOUNT * 2).to_string(),
        "invalid_exact_evm_authorization_value",
    );
    // The recipient in the signed authorization.
    add(
        &|r| exact_mut(r).authorization.as_mut().unwrap().to = Address::repeat_byte(0x66).to_vec(),
        "invalid_exact_evm_signature",
    );
    // The recipient in the requirements only: to != payTo.
    add(&|r| r.requirements.as_mut().unwrap().pay_to = PAY_TO_2.to_vec(), "invalid_exact_evm_recipient_mismatch");
    // One bit of the signature.
    add(&|r| exact_mut(r).signature[10] ^= 1, "invalid_exact_evm_signature");
    // validBefore.
    add(&|r| exact_mut(r).authorization.as_mut().unwrap().valid_before += 1, "invalid_exact_evm_signature");
    // The chain of the payload only.
    add(&|r| exact_mut(r).network = "eip155:8453".into(), "invalid_exact_evm_network_mismatch");
    // The chain of both: the signature was for another domain.
    add(
        &|r| {
            exact_mut(r).network = "eip155:8453".into();
            r.requirements.as_mut().unwrap().network = "eip155:8453".into();
        },
        "invalid_exact_evm_signature",
    );
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_payments_accepted_replayed_tampered_and_kept_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let payers: Vec<Payer> = (0..PAYERS).map(|_| Payer::random()).collect();
    let requests: Vec<pb::SubmitRequest> =
        (0..PAYERS * PER_PAYER).map(|i| signed_submit(&payers[i % PAYERS], PAY_TO, i as u64)).collect();

    let mut daemon = Daemon::start(dir.path(), &config);
    let mut client = payments(daemon.grpc, M1_KEY).await;

    let accepted = stream_all(&mut client, requests.clone()).await;
    for (i, resp) in accepted.iter().enumerate() {
        assert_eq!(resp.request_id, i as u64);
        assert_eq!(outcome(resp), pb::Outcome::Accepted, "{resp:?}");
        assert_eq!(resp.payer, payers[i % PAYERS].address().to_vec());
        assert_eq!(resp.status.as_ref().unwrap().state, pb::PaymentState::Queued as i32);
    }
    let ids: Vec<Vec<u8>> = accepted.iter().map(|r| r.payment_id.clone()).collect();
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "every payment has its own id");

    // Every one replayed: DUPLICATE with its id and status.
    let replayed = stream_all(&mut client, requests.clone()).await;
    for (resp, id) in replayed.iter().zip(&ids) {
        assert_eq!(outcome(resp), pb::Outcome::Duplicate, "{resp:?}");
        assert_eq!(&resp.payment_id, id);
        assert_eq!(resp.status.as_ref().unwrap().state, pb::PaymentState::Queued as i32);
    }

    // Tampered copies of a sample, each with its exact reason.
    let mut tampers = Vec::new();
    for original in requests.iter().step_by(97) {
        tampers.extend(tampered(original, 1_000_000 + tampers.len() as u64 * 10));
    }
    let expected: std::collections::HashMap<u64, &str> =
        tampers.iter().map(|(r, reason)| (r.request_id, *reason)).collect();
    let answers = stream_all(&mut client, tampers.into_iter().map(|(r, _)| r).collect()).await;
    for resp in &answers {
        assert_eq!(outcome(resp), pb::Outcome::Rejected, "{resp:?}");
        assert_eq!(resp.reason, expected[&resp.request_id], "request {}: {}", resp.request_id, resp.message);
    }
    // A different payment reusing a spent nonce.
    let mut reuse = requests[0].clone();
    {
        let payer = &payers[0];
        let req = requirements(PAY_TO);
        let original = exact_mut(&mut reuse).authorization.clone().unwrap();
        let nonce = alloy::primitives::B256::from_slice(&original.nonce);
        // Same nonce, a different validBefore: another payment.
        let payload = payer.sign_exact(&req, original.valid_after, original.valid_before - 1, nonce);
        reuse.payment = exact_submit(0, &req, &payload).payment;
    }
    let resp = client.submit(reuse).await.unwrap().into_inner();
    assert_eq!(resp.reason, "invalid_exact_evm_nonce_already_used", "{resp:?}");

    // A new process on the same data directory has all of them.
    daemon.stop();
    let daemon = Daemon::start(dir.path(), &config);
    let mut client = payments(daemon.grpc, M1_KEY).await;
    for (i, id) in ids.iter().enumerate() {
        let p = client.get_payment(pb::GetPaymentRequest { payment_id: id.clone() }).await.unwrap().into_inner();
        assert_eq!(p.merchant_id, "m1");
        let a = p.authorization.unwrap();
        assert_eq!(a.from, payers[i % PAYERS].address().to_vec());
        assert_eq!(a.value, AMOUNT.to_string());
    }
    let replayed = stream_all(&mut client, requests).await;
    for (resp, id) in replayed.iter().zip(&ids) {
        assert_eq!(outcome(resp), pb::Outcome::Duplicate, "{resp:?}");
        assert_eq!(&resp.payment_id, id);
    }
}
