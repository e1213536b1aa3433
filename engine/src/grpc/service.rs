//! The gRPC handlers: authenticate, convert, hand to the [`Engine`], convert
//! back. Nothing else happens here.

use std::{pin::Pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt, stream::FuturesUnordered};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use x402_proto::v1::{
    self as pb, merchant_admin_service_server::MerchantAdminService, payment_service_server::PaymentService,
};

use super::convert;
use crate::{
    Engine,
    domain::{Merchant, PaymentId, Submission},
    pipeline::{Overloaded, SubmitOutcome},
};

/// Submits one stream may have in the pipeline at once; past it the stream
/// stops reading (gRPC flow control slows the client).
const MAX_IN_FLIGHT_PER_STREAM: usize = 16_384;
/// How long a stream waits before retrying a submit the full pipeline refused.
const OVERLOAD_RETRY: Duration = Duration::from_micros(250);
/// Events read from the ledger per page when a watch catches up.
const WATCH_PAGE: usize = 512;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The bearer token of a request, or `UNAUTHENTICATED`.
fn bearer<T>(req: &Request<T>) -> Result<&str, Status> {
    let value = req
        .metadata()
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <api key>` metadata"))?;
    let value = value.to_str().map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| Status::unauthenticated("authorization metadata must be `Bearer <api key>`"))
}

/// `x402.engine.v1.PaymentService`.
#[derive(Debug, Clone)]
pub struct PaymentApi {
    engine: Arc<Engine>,
}

impl PaymentApi {
    /// The payment service of `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    fn merchant<T>(&self, req: &Request<T>) -> Result<Arc<Merchant>, Status> {
        let key = bearer(req)?;
        self.engine.authenticate(key).ok_or_else(|| {
            if self.engine.is_admin(key) {
                Status::permission_denied("the admin key cannot submit or read payments; use a merchant key")
            } else {
                Status::unauthenticated("unknown API key")
            }
        })
    }
}

/// How often a long-lived stream with nothing to do checks that its key
/// was not rotated.
const KEY_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The merchant `id` as it is now, if the key a stream authenticated with
/// (`key`, its hash) is still its key; else the status ending the stream.
fn still_keyed(engine: &Engine, id: &str, key: Option<[u8; 32]>) -> Result<Arc<Merchant>, Status> {
    match engine.merchant(id) {
        Some(m) if m.api_key_sha256 == key => Ok(m),
        _ => Err(Status::unauthenticated("the API key this stream authenticated with was rotated or removed")),
    }
}

impl PaymentApi {
    /// Records a claim or refund request for one of `merchant`'s channels.
    async fn channel_request(
        &self,
        merchant: &crate::domain::Merchant,
        id: alloy::primitives::B256,
        claim: bool,
        refund: Option<u128>,
    ) -> Result<Response<pb::ChannelState>, Status> {
        let channels = self.engine.channels_by_id(vec![id]).await.map_err(|e| convert::status_from_error(&e))?;
        match channels.first() {
            Some(c) if c.merchant_id != merchant.id => {
                return Err(Status::permission_denied("that channel belongs to another merchant"));
            }
            Some(_) => {}
            None => return Err(Status::not_found(format!("no channel {id}"))),
        }
        match self.engine.request_channel(id, claim, refund).await.map_err(|e| convert::status_from_error(&e))? {
            Some(view) => Ok(Response::new(convert::channel_view(&view))),
            None => Err(Status::not_found(format!("no channel {id}"))),
        }
    }
}

async fn wait(request_id: u64, rx: oneshot::Receiver<SubmitOutcome>) -> pb::SubmitResponse {
    let outcome = rx.await.unwrap_or_else(|_| SubmitOutcome::Unavailable("pipeline stopped".into()));
    convert::submit_response(request_id, outcome)
}

#[tonic::async_trait]
impl PaymentService for PaymentApi {
    async fn submit(&self, req: Request<pb::SubmitRequest>) -> Result<Response<pb::SubmitResponse>, Status> {
        let merchant = self.merchant(&req)?;
        let req = req.into_inner();
        let request_id = req.request_id;
        let submission = convert::submission(req).map_err(|e| convert::invalid_argument(&e))?;
        match self.engine.submit(merchant, submission).await {
            Err(Overloaded(_)) => Err(Status::resource_exhausted("the verification pipeline is full; retry shortly")),
            Ok(SubmitOutcome::Invalid(field)) => Err(convert::invalid_argument(&field)),
            Ok(SubmitOutcome::Unavailable(message)) => Err(Status::unavailable(message)),
            Ok(outcome) => Ok(Response::new(convert::submit_response(request_id, outcome))),
        }
    }

    type SubmitStreamStream = BoxStream<pb::SubmitResponse>;

    async fn submit_stream(
        &self,
        req: Request<Streaming<pb::SubmitRequest>>,
    ) -> Result<Response<Self::SubmitStreamStream>, Status> {
        let merchant = self.merchant(&req)?;
        let (merchant_id, key) = (merchant.id.clone(), merchant.api_key_sha256);
        let mut inbound = req.into_inner();
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            let mut in_flight = FuturesUnordered::new();
            let mut stalled: Option<(u64, Box<Submission>)> = None;
            let mut inbound_open = true;
            loop {
                let can_read = inbound_open && stalled.is_none() && in_flight.len() < MAX_IN_FLIGHT_PER_STREAM;
                tokio::select! {
                    biased;
                    Some(resp) = in_flight.next(), if !in_flight.is_empty() => {
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                    () = tokio::time::sleep(OVERLOAD_RETRY), if stalled.is_some() => {
                        let (request_id, submission) = stalled.take().expect("checked");
                        let merchant = match still_keyed(&engine, &merchant_id, key) {
                            Ok(m) => m,
                            Err(status) => return drop(tx.send(Err(status)).await),
                        };
                        match engine.try_submit(merchant, *submission) {
                            Ok(rx) => in_flight.push(wait(request_id, rx)),
                            Err(Overloaded(submission)) => stalled = Some((request_id, submission)),
                        }
                    }
                    msg = inbound.message(), if can_read => match msg {
                        Ok(Some(req)) => {
                            let request_id = req.request_id;
                            let submission = match convert::submission(req) {
                                Ok(s) => s,
                                Err(field) => {
                                    let resp = convert::submit_response(request_id, SubmitOutcome::Invalid(field));
                                    if tx.send(Ok(resp)).await.is_err() {
                                        return;
                                    }
                                    continue;
                                }
                            };
                            // The merchant's current policy applies to each
                            // payment, and only while the key still is its.
                            let merchant = match still_keyed(&engine, &merchant_id, key) {
                                Ok(m) => m,
                                Err(status) => return drop(tx.send(Err(status)).await),
                            };
                            match engine.try_submit(merchant, submission) {
                                Ok(rx) => in_flight.push(wait(request_id, rx)),
                                Err(Overloaded(submission)) => stalled = Some((request_id, submission)),
                            }
                        }
                        Ok(None) => inbound_open = false,
                        Err(status) => {
                            tracing::debug!(%status, "submit stream broke");
                            inbound_open = false;
                        }
                    },
                    else => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_payment(&self, req: Request<pb::GetPaymentRequest>) -> Result<Response<pb::Payment>, Status> {
        let merchant = self.merchant(&req)?;
        let id = req.into_inner().payment_id;
        if id.len() != 32 {
            return Err(Status::invalid_argument(format!("payment_id: must be 32 bytes, got {}", id.len())));
        }
        let id = PaymentId(alloy::primitives::B256::from_slice(&id));
        let payment = self.engine.payment(id).await.map_err(|e| convert::status_from_error(&e))?;
        match payment {
            Some(p) if p.merchant_id == merchant.id => Ok(Response::new(convert::payment(&p))),
            Some(_) => Err(Status::permission_denied("that payment belongs to another merchant")),
            None => Err(Status::not_found(format!("no payment {id}"))),
        }
    }

    async fn get_channel(&self, req: Request<pb::GetChannelRequest>) -> Result<Response<pb::ChannelState>, Status> {
        let merchant = self.merchant(&req)?;
        let id = req.into_inner().channel_id;
        if id.len() != 32 {
            return Err(Status::invalid_argument(format!("channel_id: must be 32 bytes, got {}", id.len())));
        }
        let id = alloy::primitives::B256::from_slice(&id);
        let channels = self.engine.channels_by_id(vec![id]).await.map_err(|e| convert::status_from_error(&e))?;
        match channels.first() {
            Some(c) if c.merchant_id == merchant.id => Ok(Response::new(convert::channel(c))),
            Some(_) => Err(Status::permission_denied("that channel belongs to another merchant")),
            None => Err(Status::not_found(format!("no channel {id}"))),
        }
    }

    async fn list_channels(
        &self,
        req: Request<pb::ListChannelsRequest>,
    ) -> Result<Response<pb::ListChannelsResponse>, Status> {
        let merchant = self.merchant(&req)?;
        let channels =
            self.engine.merchant_channels(merchant.id.clone()).await.map_err(|e| convert::status_from_error(&e))?;
        let channels = channels.iter().map(convert::channel).collect();
        Ok(Response::new(pb::ListChannelsResponse { channels }))
    }

    async fn claim_channel(&self, req: Request<pb::ClaimChannelRequest>) -> Result<Response<pb::ChannelState>, Status> {
        let merchant = self.merchant(&req)?;
        let (id, _) =
            convert::channel_request(&req.into_inner().channel_id, None).map_err(|e| convert::invalid_argument(&e))?;
        self.channel_request(&merchant, id, true, None).await
    }

    async fn refund_channel(
        &self,
        req: Request<pb::RefundChannelRequest>,
    ) -> Result<Response<pb::ChannelState>, Status> {
        let merchant = self.merchant(&req)?;
        let req = req.into_inner();
        let (id, amount) =
            convert::channel_request(&req.channel_id, Some(&req.amount)).map_err(|e| convert::invalid_argument(&e))?;
        self.channel_request(&merchant, id, false, amount).await
    }

    type WatchSettlementsStream = BoxStream<pb::SettlementEvent>;

    async fn watch_settlements(
        &self,
        req: Request<pb::WatchSettlementsRequest>,
    ) -> Result<Response<Self::WatchSettlementsStream>, Status> {
        let merchant = self.merchant(&req)?;
        let mut cursor = req.into_inner().after_sequence;
        let engine = self.engine.clone();
        let mut sequence = engine.event_sequence();
        let key = merchant.api_key_sha256;
        let mut key_check = tokio::time::interval(KEY_CHECK_EVERY);
        key_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (tx, rx) = mpsc::channel(WATCH_PAGE);
        tokio::spawn(async move {
            loop {
                let last = *sequence.borrow_and_update();
                while cursor < last {
                    let page = match engine.merchant_events_after(merchant.number, cursor, WATCH_PAGE).await {
                        Ok(page) => page,
                        Err(err) => {
                            let _ = tx.send(Err(convert::status_from_error(&err))).await;
                            return;
                        }
                    };
                    if page.is_empty() {
                        break;
                    }
                    for event in &page {
                        cursor = event.sequence;
                        if tx.send(Ok(convert::event(event))).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    changed = sequence.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                    _ = key_check.tick() => {
                        if let Err(status) = still_keyed(&engine, &merchant.id, key) {
                            return drop(tx.send(Err(status)).await);
                        }
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// `x402.engine.v1.MerchantAdminService`.
#[derive(Debug, Clone)]
pub struct MerchantAdminApi {
    engine: Arc<Engine>,
}

impl MerchantAdminApi {
    /// The merchant admin service of `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let key = bearer(req)?;
        if self.engine.is_admin(key) {
            Ok(())
        } else if self.engine.authenticate(key).is_some() {
            Err(Status::permission_denied("merchant admin needs the admin key"))
        } else {
            Err(Status::unauthenticated("unknown API key"))
        }
    }
}

#[tonic::async_trait]
impl MerchantAdminService for MerchantAdminApi {
    async fn upsert_merchant(&self, req: Request<pb::UpsertMerchantRequest>) -> Result<Response<pb::Merchant>, Status> {
        self.admin(&req)?;
        let update = convert::merchant_update(req.into_inner()).map_err(|e| convert::invalid_argument(&e))?;
        let merchant = self.engine.upsert_merchant(update).await.map_err(|e| convert::status_from_error(&e))?;
        Ok(Response::new(convert::merchant(&merchant)))
    }

    async fn get_merchant(&self, req: Request<pb::GetMerchantRequest>) -> Result<Response<pb::Merchant>, Status> {
        self.admin(&req)?;
        let id = req.into_inner().id;
        let merchant = self.engine.merchant(&id).ok_or_else(|| Status::not_found(format!("no merchant {id:?}")))?;
        Ok(Response::new(convert::merchant(&merchant)))
    }

    async fn list_merchants(
        &self,
        req: Request<pb::ListMerchantsRequest>,
    ) -> Result<Response<pb::ListMerchantsResponse>, Status> {
        self.admin(&req)?;
        let merchants = self.engine.merchants().iter().map(|m| convert::merchant(m)).collect();
        Ok(Response::new(pb::ListMerchantsResponse { merchants }))
    }
}
