//! The HTTP listener: Prometheus `/metrics`, `/healthz`, and the x402
//! facilitator API ([`crate::facilitator`]).

use std::{future::Future, sync::OnceLock};

use axum::{Router, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::Result;

/// The process-wide Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Suffix("_seconds".into()),
                &[0.000_25, 0.000_5, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 1.0],
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full(crate::metrics::COMMIT_GROUP_SIZE.into()),
                    &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0],
                )
            })
            .expect("bucket lists are not empty")
            .install_recorder()
            .expect("the only place a recorder is installed");
        crate::metrics::describe();
        handle
    })
}

/// Serves `/metrics`, `/healthz` and the routes of `api` on `listener`
/// until `shutdown` completes.
/// `/healthz` answers 503 once a pipeline thread has died (`died`).
pub async fn serve(
    listener: TcpListener,
    api: Router,
    died: tokio::sync::watch::Receiver<Option<String>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let handle = prometheus().clone();
    let healthz = move || {
        let answer = match &*died.borrow() {
            None => (StatusCode::OK, "ok".to_owned()),
            Some(thread) => (StatusCode::SERVICE_UNAVAILABLE, format!("pipeline thread {thread} died")),
        };
        std::future::ready(answer)
    };
    let app = Router::new()
        .route("/metrics", get(move || std::future::ready(handle.render())))
        .route("/healthz", get(healthz))
        .merge(api);
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
