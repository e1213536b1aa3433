//! The gRPC adapter: `x402.engine.v1` services, `grpc.health.v1` and server
//! reflection on one listener, with optional TLS.

pub(crate) mod convert;
mod service;

use std::{future::Future, sync::Arc};

use tokio::net::TcpListener;
use tonic::transport::{Server, ServerTlsConfig, server::TcpIncoming};
use x402_proto::v1::{
    merchant_admin_service_server::MerchantAdminServiceServer, payment_service_server::PaymentServiceServer,
};

pub use self::{
    convert::submit_request,
    service::{MerchantAdminApi, PaymentApi},
};
use crate::{Engine, Result};

/// Largest gRPC message accepted, in bytes. A submit is well under 2 KiB.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024;

/// Serves the engine's gRPC API on `listener` until `shutdown` completes,
/// at most `max_concurrent_streams` calls at once per connection.
pub async fn serve(
    engine: Arc<Engine>,
    listener: TcpListener,
    tls: Option<ServerTlsConfig>,
    max_concurrent_streams: u32,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<()> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<PaymentServiceServer<PaymentApi>>().await;
    health.set_serving::<MerchantAdminServiceServer<MerchantAdminApi>>().await;
    // A dead pipeline thread answers nothing again: NOT_SERVING, for good.
    let mut died = engine.pipeline_died();
    let reporter = health.clone();
    tokio::spawn(async move {
        if died.wait_for(Option::is_some).await.is_ok() {
            reporter.set_not_serving::<PaymentServiceServer<PaymentApi>>().await;
            reporter.set_not_serving::<MerchantAdminServiceServer<MerchantAdminApi>>().await;
            reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
        }
    });
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(x402_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection_v1, reflection_v1alpha) = (reflection().build_v1()?, reflection().build_v1alpha()?);

    let mut server = Server::builder().max_concurrent_streams(Some(max_concurrent_streams));
    if let Some(tls) = tls {
        server = server.tls_config(tls)?;
    }
    server
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            PaymentServiceServer::new(PaymentApi::new(engine.clone())).max_decoding_message_size(MAX_MESSAGE_SIZE),
        )
        .add_service(
            MerchantAdminServiceServer::new(MerchantAdminApi::new(engine)).max_decoding_message_size(MAX_MESSAGE_SIZE),
        )
        // Acks are small writes: without TCP_NODELAY each waits for the peer's delayed ACK.
        .serve_with_incoming_shutdown(TcpIncoming::from(listener).with_nodelay(Some(true)), shutdown)
        .await?;
    Ok(())
}
