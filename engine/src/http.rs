//! The HTTP listener: Prometheus `/metrics`, `/healthz`, and the x402
//! facilitator API ([`crate::facilitator`]), in plain HTTP or TLS.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, OnceLock},
    time::Duration,
};

use axum::{Router, http::StatusCode, routing::get, serve::Listener};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::Result;

/// The process-wide Prometheus recorder, installed on first use.
pub(crate) fn prometheus() -> &'static PrometheusHandle {
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

/// TLS handshakes in progress at most; more connections wait to start
/// theirs.
const MAX_HANDSHAKES: usize = 1024;

/// TLS handshakes in progress from one address at most; more connections
/// from it are closed at once, so that one host cannot take every place.
const MAX_HANDSHAKES_PER_PEER: usize = 32;

/// A handshake not done by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The HTTP listener's connections after their TLS handshake. Handshakes
/// run on their own tasks (at most [`MAX_HANDSHAKES`] at once, each within
/// [`HANDSHAKE_TIMEOUT`]), so a client slow to finish one holds up no one
/// else's.
struct TlsListener {
    handshaken: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: tokio::task::AbortHandle,
}

impl TlsListener {
    fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, handshaken) = mpsc::channel(MAX_HANDSHAKES);
        let acceptor = TlsAcceptor::from(config);
        let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let per_peer: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>> = Arc::default();
        let task = tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, then go on.
                        tracing::warn!(error = %e, "accepting an HTTP connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                {
                    let mut peers = per_peer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    let n = peers.entry(peer.ip()).or_default();
                    if *n >= MAX_HANDSHAKES_PER_PEER {
                        tracing::debug!(%peer, "too many TLS handshakes from one address; closed");
                        continue;
                    }
                    *n += 1;
                }
                let Ok(permit) = handshakes.clone().acquire_owned().await else { return };
                let (acceptor, tx, per_peer) = (acceptor.clone(), tx.clone(), per_peer.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    let _peer = PeerSlot(per_peer, peer.ip());
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => drop(tx.send((tls, peer)).await),
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { handshaken, local, acceptor: task.abort_handle() })
    }
}

/// One handshake in progress from an address; given back when dropped.
struct PeerSlot(Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>, std::net::IpAddr);

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut peers = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = peers.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                peers.remove(&self.1);
            }
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.handshaken.recv().await {
            Some(accepted) => accepted,
            // The acceptor is gone (shutting down): no more connections.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The rustls server configuration of the HTTP listener from PEM files,
/// offering HTTP/2 and HTTP/1.1.
pub(crate) fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let invalid = |what: &str, e: &dyn std::fmt::Display| crate::Error::Config(format!("server.tls: {what}: {e}"));
    let certs = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("cert_file", &e))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid("key_file", &e))?;
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid("the certificate and key", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `/metrics`, `/healthz` and the routes of `api` on `listener`
/// (with TLS when `tls` is given) until `shutdown` completes.
/// `/healthz` answers 503 once a pipeline thread has died (`died`).
pub(crate) async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
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
    match tls {
        Some(config) => axum::serve(TlsListener::new(listener, config)?, app).with_graceful_shutdown(shutdown).await?,
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await?,
    }
    Ok(())
}
