//! One test per rejection reason and per error status, on in-process nodes.

use alloy::primitives::{Address, U256};
use base64::Engine as _;
use tonic::Code;
use x402_engine::{
    config::PolicyConfig,
    domain::{ExactPayload, Requirements},
};
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet::Payer;

struct Fixture {
    _dir: tempfile::TempDir,
    node: x402_engine::node::Node,
    m1: Payments,
    payer: Payer,
}

async fn fixture() -> Fixture {
    fixture_with(|_| {}).await
}

async fn fixture_with(adjust: impl FnOnce(&mut x402_engine::config::Config)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_value(dir.path());
    adjust(&mut config);
    let node = start_node(&config).await;
    let m1 = payments(node.endpoints().grpc, M1_KEY).await;
    Fixture { _dir: dir, node, m1, payer: Payer::random() }
}

fn submit_of(req: &Requirements, payload: &ExactPayload) -> pb::SubmitRequest {
    exact_submit(7, req, payload)
}

fn valid(payer: &Payer, req: &Requirements) -> ExactPayload {
    payer.sign_exact(req, now() - 600, now() + 3600, random_nonce())
}

async fn expect_reason(client: &mut Payments, submit: pb::SubmitRequest, reason: &str) -> pb::SubmitResponse {
    let resp = client.submit(submit).await.expect("a rejection is an answer, not an error").into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Rejected, "{resp:?}");
    assert_eq!(resp.reason, reason, "{}", resp.message);
    assert_eq!(resp.request_id, 7);
    assert!(!resp.message.is_empty());
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheme() {
    let mut f = fixture().await;
    let mut req = requirements(PAY_TO);
    let payload = valid(&f.payer, &req);
    req.scheme = "upto".into();
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_scheme").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_eip712_domain() {
    let mut f = fixture().await;
    let mut req = requirements(PAY_TO);
    let payload = valid(&f.payer, &req);
    req.eip712_version = String::new();
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_missing_eip712_domain").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_mismatch() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    let mut payload = valid(&f.payer, &req);
    payload.network = "eip155:1".into();
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_network_mismatch").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_network_and_unaccepted_asset() {
    let mut f = fixture_with(|c| {
        let mut m3 = merchant_config("m3", PAY_TO, "test-merchant-three-key-01", PolicyConfig::Direct);
        m3.assets = vec![x402_engine::config::AssetConfig { network: "eip155:8453".into(), asset: TOKEN.to_string() }];
        c.merchants.push(m3);
    })
    .await;
    let mut req = requirements(PAY_TO);
    req.network = "solana:5eykt4UsFv8P8NJdTREpY1vzqKqZKvdp".into();
    let payload = valid(&f.payer, &req);
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_network").await;

    let mut m3 = payments(f.node.endpoints().grpc, "test-merchant-three-key-01").await;
    let req = requirements(PAY_TO);
    let payload = valid(&f.payer, &req);
    let resp = expect_reason(&mut m3, submit_of(&req, &payload), "invalid_network").await;
    assert!(resp.message.contains("does not accept"), "{}", resp.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signature() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    // Signed by someone else on behalf of the payer.
    let mut payload = valid(&f.payer, &req);
    payload.signature = Payer::random().sign_authorization(&req, &payload.authorization);
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_signature").await;
    // A smart-wallet (ERC-6492) signature is refused with a clear message.
    let mut wrapped = vec![1u8; 96];
    wrapped.extend_from_slice(&[0x64, 0x92].repeat(16));
    payload.signature = wrapped;
    let resp = expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_signature").await;
    assert!(resp.message.contains("ERC-6492"), "{}", resp.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_mismatch() {
    let mut f = fixture().await;
    // to != payTo.
    let req = requirements(PAY_TO);
    let mut other = req.clone();
    other.pay_to = Address::repeat_byte(0x42);
    let payload = valid(&f.payer, &other);
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_recipient_mismatch").await;
    // payTo is not this merchant's address (it is m2's).
    let req = requirements(PAY_TO_2);
    let payload = valid(&f.payer, &req);
    let resp = expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_recipient_mismatch").await;
    assert!(resp.message.contains("merchant"), "{}", resp.message);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_before_respects_the_strategy_minimum() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    let payload = f.payer.sign_exact(&req, now() - 600, now() + 3, random_nonce());
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_payload_authorization_valid_before").await;
    // 20 s left: enough for direct (m1), not for batched (m2, 30 s).
    let req2 = requirements(PAY_TO_2);
    let mut m2 = payments(f.node.endpoints().grpc, M2_KEY).await;
    let payload = f.payer.sign_exact(&req2, now() - 600, now() + 20, random_nonce());
    expect_reason(&mut m2, submit_of(&req2, &payload), "invalid_exact_evm_payload_authorization_valid_before").await;
    let payload = f.payer.sign_exact(&req, now() - 600, now() + 20, random_nonce());
    let resp = f.m1.submit(submit_of(&req, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_after() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    let payload = f.payer.sign_exact(&req, now() + 120, now() + 3600, random_nonce());
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_payload_authorization_valid_after").await;
    // EIP-3009 needs `block.timestamp > validAfter`: `validAfter == now`
    // (and a second before) would be accepted and never settle. (Two seconds
    // before is refused too, unless the clock ticks between here and the
    // verifier: not asserted.)
    for before in [0, 1] {
        let payload = f.payer.sign_exact(&req, now() - before, now() + 3600, random_nonce());
        expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_payload_authorization_valid_after")
            .await;
    }
    let payload = f.payer.sign_exact(&req, now() - 5, now() + 3600, random_nonce());
    let resp = f.m1.submit(submit_of(&req, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value() {
    let mut f = fixture().await;
    let mut req = requirements(PAY_TO);
    let payload = valid(&f.payer, &req);
    req.amount = U256::from(AMOUNT + 1);
    expect_reason(&mut f.m1, submit_of(&req, &payload), "invalid_exact_evm_authorization_value").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nonce_already_used() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    let nonce = random_nonce();
    let first = f.payer.sign_exact(&req, now() - 600, now() + 3600, nonce);
    let resp = f.m1.submit(submit_of(&req, &first)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted);
    let second = f.payer.sign_exact(&req, now() - 600, now() + 3000, nonce);
    expect_reason(&mut f.m1, submit_of(&req, &second), "invalid_exact_evm_nonce_already_used").await;
    // The original itself is a duplicate, not a reuse.
    let resp = f.m1.submit(submit_of(&req, &first)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Duplicate);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insufficient_balance_counts_pending_payments_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let payer = Payer::random();
    let mut config = config_value(dir.path());
    config.balances.accounts.push(x402_engine::config::BalanceAccount {
        network: NETWORK.into(),
        token: TOKEN.to_string(),
        owner: payer.address().to_string(),
        amount: (AMOUNT * 2 + AMOUNT / 2).to_string(),
    });
    let req = requirements(PAY_TO);
    {
        let node = start_node(&config).await;
        let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
        for _ in 0..2 {
            let resp = m1.submit(submit_of(&req, &valid(&payer, &req))).await.unwrap().into_inner();
            assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
        }
        expect_reason(&mut m1, submit_of(&req, &valid(&payer, &req)), "invalid_exact_evm_insufficient_balance").await;
        // Another payer is not limited.
        let resp = m1.submit(submit_of(&req, &valid(&Payer::random(), &req))).await.unwrap().into_inner();
        assert_eq!(outcome(&resp), pb::Outcome::Accepted);
        node.wait(async {}).await.unwrap();
    }
    // The reservations are rebuilt from the ledger.
    let node = start_node(&config).await;
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    expect_reason(&mut m1, submit_of(&req, &valid(&payer, &req)), "invalid_exact_evm_insufficient_balance").await;
}

fn header_of(req: &Requirements, payload: &ExactPayload) -> String {
    let a = &payload.authorization;
    let json = serde_json::json!({
        "x402Version": 2,
        "resource": {"url": "https://api.example/weather"},
        "accepted": {
            "scheme": "exact",
            "network": payload.network,
            "amount": req.amount.to_string(),
            "asset": req.asset.to_string(),
            "payTo": req.pay_to.to_string(),
            "maxTimeoutSeconds": 60,
            "extra": {"name": req.eip712_name, "version": req.eip712_version},
        },
        "payload": {
            "signature": format!("0x{}", hex::encode(&payload.signature)),
            "authorization": {
                "from": a.from.to_string(),
                "to": a.to.to_string(),
                "value": a.value.to_string(),
                "validAfter": a.valid_after.to_string(),
                "validBefore": a.valid_before.to_string(),
                "nonce": a.nonce.to_string(),
            },
        },
    });
    base64::engine::general_purpose::STANDARD.encode(json.to_string())
}

fn header_submit_of(req: &Requirements, header: String) -> pb::SubmitRequest {
    header_submit(9, req, header)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_header_is_verified_like_typed() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    let payload = valid(&f.payer, &req);
    let header = header_of(&req, &payload);
    let resp = f.m1.submit(header_submit_of(&req, header.clone())).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
    // The same payment typed is the same payment.
    let resp = f.m1.submit(submit_of(&req, &payload)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Duplicate, "{resp:?}");
    let resp = f.m1.submit(header_submit_of(&req, header)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Duplicate, "{resp:?}");
    // A tampered header is rejected with the reason.
    let mut tampered = payload.clone();
    tampered.authorization.value = U256::from(1);
    let mut cheap = req.clone();
    cheap.amount = U256::from(1);
    let resp = f.m1.submit(header_submit_of(&cheap, header_of(&cheap, &tampered))).await.unwrap().into_inner();
    assert_eq!(resp.reason, "invalid_exact_evm_signature", "{resp:?}");
}

async fn expect_invalid(client: &mut Payments, submit: pb::SubmitRequest, field: &str) {
    let status = client.submit(submit).await.expect_err("malformed input is an error");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with(field), "{:?} should name {field}", status.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_is_invalid_argument_naming_the_field() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    let good = submit_of(&req, &valid(&f.payer, &req));
    let with = |edit: &dyn Fn(&mut pb::SubmitRequest)| {
        let mut s = good.clone();
        edit(&mut s);
        s
    };
    expect_invalid(&mut f.m1, with(&|s| s.requirements = None), "requirements").await;
    expect_invalid(&mut f.m1, with(&|s| s.requirements.as_mut().unwrap().amount = "12a".into()), "requirements.amount")
        .await;
    expect_invalid(
        &mut f.m1,
        with(&|s| s.requirements.as_mut().unwrap().asset.pop().map(drop).unwrap()),
        "requirements.asset",
    )
    .await;
    expect_invalid(&mut f.m1, with(&|s| s.requirements.as_mut().unwrap().pay_to.clear()), "requirements.pay_to").await;
    expect_invalid(
        &mut f.m1,
        with(&|s| s.requirements.as_mut().unwrap().eip712_name = "x".repeat(1000)),
        "requirements.eip712_name",
    )
    .await;
    expect_invalid(&mut f.m1, with(&|s| s.payment = None), "payment").await;
    expect_invalid(&mut f.m1, with(&|s| exact_mut(s).authorization = None), "exact.authorization").await;
    expect_invalid(
        &mut f.m1,
        with(&|s| exact_mut(s).authorization.as_mut().unwrap().from.push(0)),
        "exact.authorization.from",
    )
    .await;
    expect_invalid(
        &mut f.m1,
        with(&|s| exact_mut(s).authorization.as_mut().unwrap().to.clear()),
        "exact.authorization.to",
    )
    .await;
    expect_invalid(
        &mut f.m1,
        with(&|s| exact_mut(s).authorization.as_mut().unwrap().value = "-5".into()),
        "exact.authorization.value",
    )
    .await;
    expect_invalid(
        &mut f.m1,
        with(&|s| exact_mut(s).authorization.as_mut().unwrap().nonce.truncate(31)),
        "exact.authorization.nonce",
    )
    .await;
    expect_invalid(&mut f.m1, with(&|s| exact_mut(s).signature = vec![0; 5000]), "exact.signature").await;
    expect_invalid(&mut f.m1, header_submit_of(&req, "A".repeat(17_000)), "payment_signature_header").await;
    expect_invalid(&mut f.m1, header_submit_of(&req, "not base64!".into()), "payment_signature_header").await;
    let not_x402 = base64::engine::general_purpose::STANDARD.encode(r#"{"hello": "world"}"#);
    expect_invalid(&mut f.m1, header_submit_of(&req, not_x402), "payment_signature_header").await;
    // A version x402d does not speak is refused as such; a v2 body that
    // says it is v1 is read as v1 (an X-PAYMENT header), and lacks its
    // shape.
    let versioned = |v: u32| {
        base64::engine::general_purpose::STANDARD.encode(
            decode_b64(&header_of(&req, &valid(&f.payer, &req)))
                .replace("\"x402Version\":2", &format!("\"x402Version\":{v}")),
        )
    };
    expect_invalid(&mut f.m1, header_submit_of(&req, versioned(3)), "payment_signature_header.x402Version").await;
    expect_invalid(&mut f.m1, header_submit_of(&req, versioned(1)), "payment_signature_header").await;
    let bad_from = base64::engine::general_purpose::STANDARD
        .encode(decode_b64(&header_of(&req, &valid(&f.payer, &req))).replacen("\"from\":\"0x", "\"from\":\"0xzz", 1));
    expect_invalid(&mut f.m1, header_submit_of(&req, bad_from), "payment_signature_header.payload.authorization.from")
        .await;

    // Nothing of the above was recorded: the good payment is still new.
    let resp = f.m1.submit(good.clone()).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");

    // In a stream the same input gets an ERROR outcome, and the stream goes on.
    let bad = with(&|s| s.requirements.as_mut().unwrap().amount = "x".into());
    let next = submit_of(&req, &valid(&f.payer, &req));
    let out = stream_all(&mut f.m1, vec![bad, pb::SubmitRequest { request_id: 8, ..next }]).await;
    assert_eq!(outcome(&out[0]), pb::Outcome::Error);
    assert_eq!(out[0].error_code, Code::InvalidArgument as i32);
    assert!(out[0].message.starts_with("requirements.amount"), "{}", out[0].message);
    assert_eq!(outcome(&out[1]), pb::Outcome::Accepted);
}

fn decode_b64(s: &str) -> String {
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_and_permissions() {
    let f = fixture().await;
    let addr = f.node.endpoints().grpc;
    let req = requirements(PAY_TO);
    let submit = submit_of(&req, &valid(&f.payer, &req));

    // No key.
    let mut anonymous = x402_proto::v1::payment_service_client::PaymentServiceClient::new(channel(addr).await);
    let status = anonymous.submit(submit.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // Unknown key.
    let status = payments(addr, "no-such-key-000000000").await.submit(submit.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // The admin key does not pay.
    let status = payments(addr, ADMIN_KEY).await.submit(submit.clone()).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // A merchant key does not administer.
    let status = admin(addr, M1_KEY).await.list_merchants(pb::ListMerchantsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status =
        admin(addr, "no-such-key-000000000").await.list_merchants(pb::ListMerchantsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");

    // A merchant reads only its own payments.
    let mut m1 = payments(addr, M1_KEY).await;
    let resp = m1.submit(submit).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted);
    let get = pb::GetPaymentRequest { payment_id: resp.payment_id.clone() };
    assert_eq!(m1.get_payment(get.clone()).await.unwrap().into_inner().payment_id, resp.payment_id);
    let status = payments(addr, M2_KEY).await.get_payment(get).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    let status = m1.get_payment(pb::GetPaymentRequest { payment_id: vec![0; 32] }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    let status = m1.get_payment(pb::GetPaymentRequest { payment_id: vec![0; 3] }).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("payment_id"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pipeline_answers_resource_exhausted() {
    let f = fixture_with(|c| {
        c.pipeline.queue_capacity = 1;
        c.pipeline.verifiers = 1;
    })
    .await;
    let addr = f.node.endpoints().grpc;
    let req = requirements(PAY_TO);
    let submits: Vec<_> = (0..400).map(|_| submit_of(&req, &valid(&f.payer, &req))).collect();
    let mut tasks = Vec::new();
    for submit in submits {
        let mut client = payments(addr, M1_KEY).await;
        tasks.push(tokio::spawn(async move { client.submit(submit).await }));
    }
    let (mut accepted, mut exhausted) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            Ok(resp) => {
                assert_eq!(outcome(&resp.into_inner()), pb::Outcome::Accepted);
                accepted += 1;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                exhausted += 1;
            }
        }
    }
    assert!(accepted > 0, "some got through");
    assert!(exhausted > 0, "a queue of one overflows under 400 concurrent submits");
}

/// A gateway's `idempotency_key`: the same key and payment from the same
/// merchant is a retry (ACCEPTED again, marked); any other resubmit is
/// DUPLICATE, "already paid for: do not serve again"; the key with another
/// payment is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_tells_a_retry_from_a_replay() {
    let mut f = fixture().await;
    let req = requirements(PAY_TO);
    let payload = valid(&f.payer, &req);
    let keyed = |payload: &ExactPayload, key: &str| pb::SubmitRequest {
        idempotency_key: key.into(),
        ..submit_of(&req, payload)
    };
    let first = f.m1.submit(keyed(&payload, "gw-request-0000000001")).await.unwrap().into_inner();
    assert_eq!((outcome(&first), first.retry), (pb::Outcome::Accepted, false), "{first:?}");
    let retry = f.m1.submit(keyed(&payload, "gw-request-0000000001")).await.unwrap().into_inner();
    assert_eq!((outcome(&retry), retry.retry), (pb::Outcome::Accepted, true), "{retry:?}");
    assert_eq!(retry.payment_id, first.payment_id);
    for replay in [submit_of(&req, &payload), keyed(&payload, "gw-request-0000000002")] {
        let resp = f.m1.submit(replay).await.unwrap().into_inner();
        assert_eq!((outcome(&resp), resp.retry), (pb::Outcome::Duplicate, false), "{resp:?}");
    }
    // Another merchant with the key and the payment: a replay too.
    let mut m2 = payments(f.node.endpoints().grpc, M2_KEY).await;
    let mut foreign = keyed(&payload, "gw-request-0000000001");
    foreign.requirements.as_mut().unwrap().pay_to = PAY_TO.to_vec();
    let resp = m2.submit(foreign).await.unwrap().into_inner();
    assert_ne!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");

    expect_reason(&mut f.m1, keyed(&valid(&f.payer, &req), "gw-request-0000000001"), "payment_identifier_reused").await;
    let status = f.m1.submit(keyed(&valid(&f.payer, &req), "short")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("idempotency_key"), "{}", status.message());
}
