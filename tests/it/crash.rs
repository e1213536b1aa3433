//! SIGKILL in the middle of a stream: every payment whose ACCEPTED ack
//! reached the client is in the ledger after restart.

use std::time::Duration;

use x402_proto::v1 as pb;

use crate::common::*;
use x402_devnet::Payer;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_payments_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let payers: Vec<Payer> = (0..20).map(|_| Payer::random()).collect();
    let total = 20_000;
    let requests: Vec<pb::SubmitRequest> =
        (0..total).map(|i| signed_submit(&payers[i % payers.len()], PAY_TO, i as u64)).collect();

    let mut daemon = Daemon::start(dir.path(), &config);
    let mut client = payments(daemon.grpc, M1_KEY).await;
    // Feed the stream slowly enough that the kill lands mid-stream.
    let feed = requests.clone();
    let outbound = async_stream(feed);
    let mut responses = client.submit_stream(outbound).await.unwrap().into_inner();

    let mut acked = Vec::new();
    let kill_after = 3_000;
    // The stream ends with an error once the process is gone.
    while let Ok(Some(resp)) = responses.message().await {
        assert_eq!(outcome(&resp), pb::Outcome::Accepted, "{resp:?}");
        acked.push(resp);
        if acked.len() == kill_after {
            daemon.kill();
        }
    }
    assert!(acked.len() >= kill_after, "acks before the kill: {}", acked.len());
    assert!(acked.len() < total, "the kill landed mid-stream ({} of {total} acked)", acked.len());

    let daemon = Daemon::start(dir.path(), &config);
    let mut client = payments(daemon.grpc, M1_KEY).await;
    for resp in &acked {
        let p = client
            .get_payment(pb::GetPaymentRequest { payment_id: resp.payment_id.clone() })
            .await
            .unwrap_or_else(|s| panic!("acked payment {} lost: {s}", resp.request_id))
            .into_inner();
        assert_eq!(p.authorization.unwrap().from, resp.payer);
    }
    // And the engine still refuses to accept them twice.
    let replay: Vec<_> = acked.iter().take(500).map(|r| requests[r.request_id as usize].clone()).collect();
    for resp in stream_all(&mut client, replay).await {
        assert_eq!(outcome(&resp), pb::Outcome::Duplicate, "{resp:?}");
    }
}

/// The requests as a stream that yields to the runtime between items, in
/// chunks, so the server sees them over time rather than all at once.
fn async_stream(requests: Vec<pb::SubmitRequest>) -> impl tokio_stream::Stream<Item = pb::SubmitRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for chunk in requests.chunks(200) {
            for req in chunk {
                if tx.send(req.clone()).await.is_err() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
