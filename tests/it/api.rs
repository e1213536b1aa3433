//! The rest of the API: resumable settlement watches, merchant admin with
//! runtime strategy changes, health, reflection, TLS and metrics.

use std::time::Duration;
use x402_engine::testing::FaultyLedger;

use tonic::Code;
use x402_engine::config::PolicyConfig;
use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet::Payer;

async fn next_events(stream: &mut tonic::Streaming<pb::SettlementEvent>, n: usize) -> Vec<pb::SettlementEvent> {
    let mut out = Vec::new();
    while out.len() < n {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("events arrive")
            .unwrap()
            .expect("stream open");
        out.push(event);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_settlements_resumes_from_a_cursor_and_shows_only_own_payments() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let addr = node.endpoints().grpc;
    let mut m1 = payments(addr, M1_KEY).await;
    let mut m2 = payments(addr, M2_KEY).await;
    let payer = Payer::random();

    // m1 watches live from the start.
    let mut live = m1.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    let mut m1_ids = Vec::new();
    for i in 0..10 {
        let resp = m1.submit(signed_submit(&payer, PAY_TO, i)).await.unwrap().into_inner();
        m1_ids.push(resp.payment_id);
        // Interleave a payment of m2, which m1 must not see.
        let resp = m2.submit(signed_submit(&payer, PAY_TO_2, i)).await.unwrap().into_inner();
        assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
    }
    let events = next_events(&mut live, 10).await;
    assert_eq!(events.iter().map(|e| e.payment_id.clone()).collect::<Vec<_>>(), m1_ids);
    assert!(events.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert!(events.iter().all(|e| e.status.as_ref().unwrap().state == pb::PaymentState::Queued as i32));

    // A client that saw five reconnects after the fifth and misses nothing.
    let cursor = events[4].sequence;
    drop(live);
    let mut resumed =
        m1.watch_settlements(pb::WatchSettlementsRequest { after_sequence: cursor }).await.unwrap().into_inner();
    let again = next_events(&mut resumed, 5).await;
    assert_eq!(again, events[5..].to_vec());
    // ... and keeps receiving new ones.
    let resp = m1.submit(signed_submit(&payer, PAY_TO, 99)).await.unwrap().into_inner();
    let new = next_events(&mut resumed, 1).await;
    assert_eq!(new[0].payment_id, resp.payment_id);
    assert!(new[0].sequence > events[9].sequence);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn merchant_admin_and_runtime_strategy_change() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let addr = node.endpoints().grpc;
    let mut admin = admin(addr, ADMIN_KEY).await;

    let listed = admin.list_merchants(pb::ListMerchantsRequest {}).await.unwrap().into_inner().merchants;
    assert_eq!(listed.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(), ["m1", "m2"]);
    assert!(listed.iter().all(|m| m.has_api_key));

    let direct = pb::SettlementPolicy { strategy: Some(pb::settlement_policy::Strategy::Direct(pb::DirectPolicy {})) };
    let new_key = "test-merchant-new-key-0123";
    let created = admin
        .upsert_merchant(pb::UpsertMerchantRequest {
            merchant: Some(pb::Merchant {
                id: "m9".into(),
                pay_to: vec![PAY_TO.to_vec()],
                policy: Some(direct),
                ..Default::default()
            }),
            api_key: new_key.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(created.has_api_key);
    assert_eq!(admin.get_merchant(pb::GetMerchantRequest { id: "m9".into() }).await.unwrap().into_inner(), created);

    let payer = Payer::random();
    let mut m9 = payments(addr, new_key).await;
    let first = m9.submit(signed_submit(&payer, PAY_TO, 1)).await.unwrap().into_inner();
    assert_eq!(outcome(&first), pb::Outcome::Accepted, "{first:?}");

    // Switch to batched while the merchant's stream stays open.
    let batched = pb::SettlementPolicy {
        strategy: Some(pb::settlement_policy::Strategy::Batched(pb::BatchedPolicy { max_rows: 50, max_wait_ms: 250 })),
    };
    admin
        .upsert_merchant(pb::UpsertMerchantRequest {
            merchant: Some(pb::Merchant {
                id: "m9".into(),
                pay_to: vec![PAY_TO.to_vec()],
                policy: Some(batched.clone()),
                ..Default::default()
            }),
            api_key: String::new(),
        })
        .await
        .unwrap();
    let second = m9.submit(signed_submit(&payer, PAY_TO, 2)).await.unwrap().into_inner();
    let get = |id: Vec<u8>| pb::GetPaymentRequest { payment_id: id };
    let p1 = m9.get_payment(get(first.payment_id)).await.unwrap().into_inner();
    let p2 = m9.get_payment(get(second.payment_id)).await.unwrap().into_inner();
    assert!(matches!(p1.policy.unwrap().strategy, Some(pb::settlement_policy::Strategy::Direct(_))));
    assert_eq!(p2.policy.unwrap(), batched, "a payment is queued under the strategy in force");

    // Bad admin input is INVALID_ARGUMENT naming the field; a taken key is refused.
    let status = admin
        .upsert_merchant(pb::UpsertMerchantRequest {
            merchant: Some(pb::Merchant { id: "bad id!".into(), ..Default::default() }),
            api_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("merchant.id"), "{}", status.message());
    let status = admin
        .upsert_merchant(pb::UpsertMerchantRequest {
            merchant: Some(pb::Merchant {
                id: "m10".into(),
                pay_to: vec![PAY_TO.to_vec()],
                policy: Some(batched.clone()),
                ..Default::default()
            }),
            api_key: M1_KEY.into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    // A merchant needs an address to be paid at (else it would accept any
    // recipient), and a key of 16 characters or more that is not the admin's.
    for (pay_to, key, field) in [
        (vec![], "test-merchant-ten-key-0123", "pay_to"),
        (vec![PAY_TO.to_vec()], "short-key", "api_key"),
        (vec![PAY_TO.to_vec()], ADMIN_KEY, "api_key"),
    ] {
        let merchant = pb::Merchant { id: "m10".into(), pay_to, policy: Some(batched.clone()), ..Default::default() };
        let status = admin
            .upsert_merchant(pb::UpsertMerchantRequest { merchant: Some(merchant), api_key: key.into() })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{}", status.message());
    }
    assert!(admin.get_merchant(pb::GetMerchantRequest { id: "m10".into() }).await.is_err());
    let status = admin.get_merchant(pb::GetMerchantRequest { id: "nobody".into() }).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reflection_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let endpoints = node.endpoints();

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(endpoints.grpc).await);
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest { service: "x402.engine.v1.PaymentService".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let mut reflection = ServerReflectionClient::new(channel(endpoints.grpc).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("list services answered");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["x402.engine.v1.PaymentService", "x402.engine.v1.MerchantAdminService", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{expected} in {names:?}");
    }

    let mut m1 = payments(endpoints.grpc, M1_KEY).await;
    let payer = Payer::random();
    m1.submit(signed_submit(&payer, PAY_TO, 1)).await.unwrap();
    let mut bad = signed_submit(&payer, PAY_TO, 2);
    bad.requirements.as_mut().unwrap().amount = "1".into();
    m1.submit(bad).await.unwrap();

    let body = reqwest::get(format!("http://{}/metrics", endpoints.http)).await.unwrap().text().await.unwrap();
    for needle in [
        "x402d_payments_accepted_total",
        "x402d_payments_rejected_total{reason=\"invalid_exact_evm_authorization_value\"}",
        "x402d_ledger_commit_seconds_bucket",
        "x402d_pipeline_queue_depth",
        "x402d_settlement_queue_depth{strategy=\"direct\"}",
    ] {
        assert!(body.contains(needle), "{needle} in /metrics:\n{body}");
    }
    let ok = reqwest::get(format!("http://{}/healthz", endpoints.http)).await.unwrap();
    assert!(ok.status().is_success());
}

/// The test config served over TLS with a fresh self-signed certificate
/// for `localhost` (written under `dir`), and that certificate's PEM.
fn tls_config(dir: &std::path::Path) -> (x402_engine::config::Config, String) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert_pem = cert.cert.pem();
    std::fs::write(dir.join("cert.pem"), &cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), cert.signing_key.serialize_pem()).unwrap();
    let mut config = config_value(dir);
    config.server.tls =
        Some(x402_engine::config::TlsConfig { cert_file: dir.join("cert.pem"), key_file: dir.join("key.pem") });
    (config, cert_pem)
}

/// One address holds at most 32 TLS handshakes of the HTTP listener in
/// progress: more connections from it are closed at once, and a client
/// from another address still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_handshakes_from_one_address_are_capped_and_others_still_connect() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (config, cert_pem) = tls_config(dir.path());
    let node = start_node(&config).await;
    let http = node.endpoints().http.port();
    // 32 connections from 127.0.0.1 that never say a word ...
    let mut silent = Vec::new();
    for _ in 0..32 {
        silent.push(tokio::net::TcpStream::connect(("127.0.0.1", http)).await.unwrap());
    }
    // ... (the listener has taken them all up)
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ... so the next one from there is closed at once, long before the
    // handshake timeout.
    let mut over = tokio::net::TcpStream::connect(("127.0.0.1", http)).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(2), over.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "a 33rd silent connection was kept: {read:?}");

    // A client from another address is not held up.
    let client = |from: [u8; 4]| {
        reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
            .resolve("localhost", ([127, 0, 0, 1], http).into())
            .local_address(std::net::IpAddr::from(from))
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap()
    };
    let ok = client([127, 0, 0, 2]).get(format!("https://localhost:{http}/healthz")).send().await;
    assert!(ok.expect("another address's handshake").status().is_success());
    // Once the silent ones are gone, 127.0.0.1 connects again.
    drop(silent);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ok = client([127, 0, 0, 1]).get(format!("https://localhost:{http}/healthz")).send().await;
    assert!(ok.expect("a handshake once the slots are free").status().is_success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let (mut config, cert_pem) = tls_config(dir.path());
    config.merchants.push(merchant_config("m3", PAY_TO, "test-merchant-three-key-01", PolicyConfig::Direct));
    let node = start_node(&config).await;
    let port = node.endpoints().grpc.port();

    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&cert_pem))
        .domain_name("localhost");
    let channel = tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("TLS handshake");
    let bearer: tonic::metadata::MetadataValue<_> = "Bearer test-merchant-three-key-01".parse().unwrap();
    let mut client = x402_proto::v1::payment_service_client::PaymentServiceClient::with_interceptor(
        channel,
        move |mut req: tonic::Request<()>| {
            req.metadata_mut().insert("authorization", bearer.clone());
            Ok(req)
        },
    );
    let resp = client.submit(signed_submit(&Payer::random(), PAY_TO, 1)).await.unwrap().into_inner();
    assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");

    // Plaintext is refused by a TLS listener.
    let plain = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await;
    if let Ok(plain) = plain {
        let mut health = tonic_health::pb::health_client::HealthClient::new(plain);
        assert!(health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.is_err());
    }

    // The HTTP listener (the facilitator API, /metrics, /healthz) has the
    // same certificate.
    let http = node.endpoints().http.port();
    // A client that opens a connection and never says a word holds up no
    // one else's handshake.
    let _silent = tokio::net::TcpStream::connect(("127.0.0.1", http)).await.unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], http).into())
        .build()
        .unwrap();
    let ok = client.get(format!("https://localhost:{http}/healthz")).send().await.expect("TLS handshake");
    assert!(ok.status().is_success());
    let metrics = client.get(format!("https://localhost:{http}/metrics")).send().await.unwrap();
    assert!(metrics.text().await.unwrap().contains("x402d_payments_accepted_total"));
    assert!(reqwest::get(format!("http://127.0.0.1:{http}/healthz")).await.is_err(), "plaintext HTTP answered");
}

/// A node on the test config whose memory ledger fails when the test says.
async fn faulty_node(dir: &std::path::Path) -> (x402_engine::node::Node, std::sync::Arc<FaultyLedger>) {
    let ledger = std::sync::Arc::new(FaultyLedger::new(std::sync::Arc::new(x402_engine::ledger::MemoryLedger::new())));
    let balances: std::sync::Arc<dyn x402_engine::balance::BalanceSource> =
        std::sync::Arc::new(x402_engine::balance::ConfiguredBalances::new(None));
    let node = x402_engine::node::Node::start_with(&config_value(dir), ledger.clone(), balances).await.unwrap();
    (node, ledger)
}

/// A pipeline thread that dies is not hidden: `/healthz` answers 503,
/// `grpc.health.v1` NOT_SERVING, and the node stops with an error (so the
/// process exits non-zero and a supervisor restarts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pipeline_thread_is_reported_and_stops_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ledger) = faulty_node(dir.path()).await;
    let endpoints = node.endpoints();
    let healthz = || async move { reqwest::get(format!("http://{}/healthz", endpoints.http)).await.unwrap().status() };
    assert_eq!(healthz().await, 200);

    ledger.break_commits();
    let mut m1 = payments(endpoints.grpc, M1_KEY).await;
    let answer = m1.submit(signed_submit(&Payer::random(), PAY_TO, 1)).await;
    assert!(answer.is_err() || outcome(answer.as_ref().unwrap().get_ref()) != pb::Outcome::Accepted, "{answer:?}");

    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(endpoints.grpc).await);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest { service: "x402.engine.v1.PaymentService".into() })
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(healthz().await, 503);
    let stopped = tokio::time::timeout(Duration::from_secs(10), node.wait(std::future::pending())).await;
    let err = stopped.expect("the node stops by itself").unwrap_err();
    assert!(err.to_string().contains("x402d-commit"), "{err}");
}

/// A ledger that cannot write (a full disk) makes a merchant call answer
/// `UNAVAILABLE`, which a client retries, not `INTERNAL`; once it writes
/// again the same call succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_failure_on_a_merchant_call_answers_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ledger) = faulty_node(dir.path()).await;
    let mut admin = admin(node.endpoints().grpc, ADMIN_KEY).await;
    let merchant = admin.get_merchant(pb::GetMerchantRequest { id: "m1".into() }).await.unwrap().into_inner();
    let upsert = || pb::UpsertMerchantRequest { merchant: Some(merchant.clone()), api_key: String::new() };

    ledger.fail_commits(true);
    let err = admin.upsert_merchant(upsert()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(!err.message().contains("No space"), "the storage's own words stay in the log: {}", err.message());
    // A payment too: nothing is accepted that is not recorded.
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    let answer = m1.submit(signed_submit(&Payer::random(), PAY_TO, 1)).await;
    match answer {
        Err(status) => assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}"),
        Ok(answer) => panic!("answered {:?} with the ledger failing", answer.into_inner()),
    }

    ledger.fail_commits(false);
    admin.upsert_merchant(upsert()).await.expect("the ledger writes again");
}

/// Every gRPC call answers each class of failure with its code: no key
/// `UNAUTHENTICATED`, the other role's key `PERMISSION_DENIED`, a malformed
/// request `INVALID_ARGUMENT`, a ledger that cannot be read `UNAVAILABLE`
/// (without the storage's own words).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_answers_each_failure_class_with_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let (node, ledger) = faulty_node(dir.path()).await;
    let addr = node.endpoints().grpc;
    let id = || vec![7u8; 32];
    let code = |r: Result<(), tonic::Status>| r.err().map(|s| s.code());

    // The payment service, for each key: none, the admin's, a merchant's.
    let none = pb::payment_service_client::PaymentServiceClient::new(channel(addr).await);
    let with_admin_key = payments(addr, ADMIN_KEY).await;
    let mut m1 = payments(addr, M1_KEY).await;
    macro_rules! payment_calls {
        ($client:expr, $want:expr) => {{
            let c = &mut $client;
            let want = Some($want);
            assert_eq!(code(c.submit(signed_submit(&Payer::random(), PAY_TO, 1)).await.map(drop)), want, "submit");
            assert_eq!(
                code(c.submit_stream(tokio_stream::iter(Vec::<pb::SubmitRequest>::new())).await.map(drop)),
                want,
                "submit_stream"
            );
            assert_eq!(
                code(c.get_payment(pb::GetPaymentRequest { payment_id: id() }).await.map(drop)),
                want,
                "get_payment"
            );
            assert_eq!(
                code(c.get_channel(pb::GetChannelRequest { channel_id: id() }).await.map(drop)),
                want,
                "get_channel"
            );
            assert_eq!(code(c.list_channels(pb::ListChannelsRequest {}).await.map(drop)), want, "list_channels");
            assert_eq!(
                code(c.claim_channel(pb::ClaimChannelRequest { channel_id: id() }).await.map(drop)),
                want,
                "claim_channel"
            );
            let refund = pb::RefundChannelRequest { channel_id: id(), amount: String::new() };
            assert_eq!(code(c.refund_channel(refund).await.map(drop)), want, "refund_channel");
            let watch = c.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await;
            assert_eq!(code(watch.map(drop)), want, "watch_settlements");
        }};
    }
    payment_calls!(none.clone(), Code::Unauthenticated);
    payment_calls!(with_admin_key.clone(), Code::PermissionDenied);

    // The admin service, for each key: none, a merchant's.
    let admin_none = pb::merchant_admin_service_client::MerchantAdminServiceClient::new(channel(addr).await);
    let mut admin_ok = admin(addr, ADMIN_KEY).await;
    let merchant = admin_ok.get_merchant(pb::GetMerchantRequest { id: "m1".into() }).await.unwrap().into_inner();
    let upsert = || pb::UpsertMerchantRequest { merchant: Some(merchant.clone()), api_key: String::new() };
    macro_rules! admin_calls {
        ($client:expr, $want:expr) => {{
            let c = &mut $client;
            let want = Some($want);
            assert_eq!(code(c.upsert_merchant(upsert()).await.map(drop)), want, "upsert_merchant");
            assert_eq!(
                code(c.get_merchant(pb::GetMerchantRequest { id: "m1".into() }).await.map(drop)),
                want,
                "get_merchant"
            );
            assert_eq!(code(c.list_merchants(pb::ListMerchantsRequest {}).await.map(drop)), want, "list_merchants");
        }};
    }
    admin_calls!(admin_none.clone(), Code::Unauthenticated);
    admin_calls!(admin(addr, M1_KEY).await, Code::PermissionDenied);

    // Malformed requests, with the right key.
    let short = || vec![7u8; 31];
    assert_eq!(
        code(m1.get_payment(pb::GetPaymentRequest { payment_id: short() }).await.map(drop)),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(m1.get_channel(pb::GetChannelRequest { channel_id: short() }).await.map(drop)),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(m1.claim_channel(pb::ClaimChannelRequest { channel_id: short() }).await.map(drop)),
        Some(Code::InvalidArgument)
    );
    let refund = pb::RefundChannelRequest { channel_id: id(), amount: "1e6".into() };
    assert_eq!(code(m1.refund_channel(refund).await.map(drop)), Some(Code::InvalidArgument));
    let mut bad = merchant.clone();
    bad.pay_to = vec![vec![1u8; 19]];
    let bad = pb::UpsertMerchantRequest { merchant: Some(bad), api_key: String::new() };
    assert_eq!(code(admin_ok.upsert_merchant(bad).await.map(drop)), Some(Code::InvalidArgument));
    assert_eq!(
        code(admin_ok.get_merchant(pb::GetMerchantRequest { id: "no-such".into() }).await.map(drop)),
        Some(Code::NotFound)
    );

    // A ledger that cannot be read: every call that reads it.
    let accepted = m1.submit(signed_submit(&Payer::random(), PAY_TO, 2)).await.unwrap().into_inner();
    assert_eq!(outcome(&accepted), pb::Outcome::Accepted);
    ledger.fail_reads(true);
    let unavailable = |r: Result<(), tonic::Status>, call: &str| {
        let status = r.expect_err(call);
        assert_eq!(status.code(), Code::Unavailable, "{call}: {status:?}");
        assert!(
            !status.message().contains("sst"),
            "{call}: the storage's own words stay in the log: {}",
            status.message()
        );
    };
    unavailable(
        m1.get_payment(pb::GetPaymentRequest { payment_id: accepted.payment_id.clone() }).await.map(drop),
        "get_payment",
    );
    unavailable(m1.get_channel(pb::GetChannelRequest { channel_id: id() }).await.map(drop), "get_channel");
    unavailable(m1.list_channels(pb::ListChannelsRequest {}).await.map(drop), "list_channels");
    unavailable(m1.claim_channel(pb::ClaimChannelRequest { channel_id: id() }).await.map(drop), "claim_channel");
    let refund = pb::RefundChannelRequest { channel_id: id(), amount: String::new() };
    unavailable(m1.refund_channel(refund).await.map(drop), "refund_channel");
    let mut watch = m1.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), watch.message()).await.expect("the watch answers");
    unavailable(first.map(drop), "watch_settlements");

    ledger.fail_reads(false);
    m1.get_payment(pb::GetPaymentRequest { payment_id: accepted.payment_id }).await.expect("the ledger reads again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_admin_key_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_value(dir.path());
    config.auth.admin_key = Some("admin".into());
    let Err(err) = x402_engine::node::Node::start(&config).await else { panic!("a short admin key was accepted") };
    assert!(err.to_string().contains("admin key"), "{err}");
}

/// One connection may hold only `server.max_concurrent_streams` calls open
/// at once: a further call waits for a stream to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_holds_a_bounded_number_of_streams() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_value(dir.path());
    config.server.max_concurrent_streams = 2;
    let node = start_node(&config).await;
    let mut client = payments(node.endpoints().grpc, M1_KEY).await;
    let watch = || pb::WatchSettlementsRequest { after_sequence: 0 };
    let first = client.watch_settlements(watch()).await.unwrap().into_inner();
    let _second = client.watch_settlements(watch()).await.unwrap().into_inner();
    let mut third = client.clone();
    let waiting = tokio::spawn(async move { third.watch_settlements(watch()).await.map(|_| ()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "a third stream opened on the connection");
    drop(first);
    tokio::time::timeout(Duration::from_secs(10), waiting).await.expect("opens once one closes").unwrap().unwrap();
}

/// `[ledger] retention_days`: settled payments past it are deleted by the
/// running node, payments still open are kept whatever their age.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_deletes_settled_history_and_keeps_open_payments() {
    use alloy::primitives::{Address, B256, U256};
    use x402_engine::{
        domain::{Authorization, PaymentId, PaymentRecord, PaymentState, PaymentStatus, PendingKey, SettlementPolicy},
        ledger::{Ledger, RocksLedger, RocksOptions, Write, WriteBatch},
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = config_value(dir.path());
    // Two years ago, settled and not.
    let old = now() - 2 * 365 * 86_400;
    let record = |seed: u8, state| {
        let (from, nonce) = (Address::repeat_byte(seed), B256::repeat_byte(seed));
        PaymentRecord {
            id: PaymentId::new(31337, TOKEN, from, nonce),
            merchant_id: "m1".into(),
            merchant_number: 1,
            chain_id: 31337,
            asset: TOKEN,
            eip712_name: "USD Coin".into(),
            eip712_version: "2".into(),
            authorization: Authorization {
                from,
                to: PAY_TO,
                value: U256::from(AMOUNT),
                valid_after: U256::ZERO,
                valid_before: U256::from(old),
                nonce,
            },
            signature: vec![1; 65],
            digest: B256::repeat_byte(seed),
            policy: SettlementPolicy::Direct,
            status: PaymentStatus::new(state, old * 1000),
            accepted_at_ms: old * 1000,
            idempotency: None,
            signature_kind: Default::default(),
        }
    };
    let (settled, open) = (record(1, PaymentState::Confirmed), record(2, PaymentState::Submitted));
    {
        let ledger = RocksLedger::open(&config.ledger.path, RocksOptions::default()).unwrap();
        let mut batch = WriteBatch::default();
        batch.push(Write::Enqueue(PendingKey { merchant_number: 1, deadline: old, id: open.id }));
        batch.push(Write::Payment(Box::new(settled.clone())));
        batch.push(Write::Payment(Box::new(open.clone())));
        ledger.commit(&batch).unwrap();
    }
    config.ledger.retention_days = 30;
    config.ledger.prune_every_secs = 1;
    let node = start_node(&config).await;
    let mut m1 = payments(node.endpoints().grpc, M1_KEY).await;
    // Run as `x402d serve` runs it: waiting on the node.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(node.wait(async move { drop(stopped.await) }));
    let recent = m1.submit(signed_submit(&Payer::random(), PAY_TO, 1)).await.unwrap().into_inner();
    assert_eq!(outcome(&recent), pb::Outcome::Accepted, "{}", recent.message);
    let get = |id: PaymentId| pb::GetPaymentRequest { payment_id: id.0.to_vec() };

    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while m1.get_payment(get(settled.id)).await.is_ok() {
        assert!(tokio::time::Instant::now() < deadline, "the settled payment was never pruned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(m1.get_payment(get(settled.id)).await.unwrap_err().code(), Code::NotFound);
    assert!(m1.get_payment(get(open.id)).await.is_ok(), "an open payment was pruned");
    let recent = pb::GetPaymentRequest { payment_id: recent.payment_id };
    assert!(m1.get_payment(recent).await.is_ok(), "a recent payment was pruned");
    drop(stop);
    serving.await.unwrap().unwrap();
}

/// A rotated key ends the streams it opened: a stream's next submit, and a
/// watch with nothing to send, within a second or so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_a_key_ends_the_streams_it_opened() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(&config_value(dir.path())).await;
    let addr = node.endpoints().grpc;
    let mut m1 = payments(addr, M1_KEY).await;
    let payer = Payer::random();
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let mut answers = m1.submit_stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let mut watch = m1.watch_settlements(pb::WatchSettlementsRequest { after_sequence: 0 }).await.unwrap().into_inner();
    tx.send(signed_submit(&payer, PAY_TO, 1)).await.unwrap();
    assert_eq!(outcome(&answers.message().await.unwrap().unwrap()), pb::Outcome::Accepted);
    assert!(watch.message().await.unwrap().is_some(), "the acceptance is watched");

    // The operator rotates m1's key.
    let mut admin = admin(addr, ADMIN_KEY).await;
    let merchant = admin.get_merchant(pb::GetMerchantRequest { id: "m1".into() }).await.unwrap().into_inner();
    let rotated = "test-merchant-one-rotated-key".to_owned();
    admin
        .upsert_merchant(pb::UpsertMerchantRequest { merchant: Some(merchant), api_key: rotated.clone() })
        .await
        .unwrap();

    tx.send(signed_submit(&payer, PAY_TO, 2)).await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(5), answers.message()).await.expect("the stream ends");
    assert_eq!(ended.unwrap_err().code(), Code::Unauthenticated, "a submit on the old key's stream was taken");
    let ended = tokio::time::timeout(Duration::from_secs(5), watch.message()).await.expect("the watch ends");
    assert_eq!(ended.unwrap_err().code(), Code::Unauthenticated);
    // The new key works; the old one is refused.
    let accepted = payments(addr, &rotated).await.submit(signed_submit(&payer, PAY_TO, 3)).await.unwrap().into_inner();
    assert_eq!(outcome(&accepted), pb::Outcome::Accepted, "{}", accepted.message);
    assert_eq!(m1.submit(signed_submit(&payer, PAY_TO, 4)).await.unwrap_err().code(), Code::Unauthenticated);
}
