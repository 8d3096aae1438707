//! The tonic router: the broker's services, gRPC health and server
//! reflection (v1, and v1alpha for older grpcurl), behind the gate, with
//! the HTTP/2 settings that bound what one peer can hold.

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Server, server::Connected};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::util::MapResponseLayer;

use super::{budget::RequestBudget, call_slots::CallSlots, gate::GateLayer};
use crate::{
    api::{AdminApi, ApiContext, SecretsApi, SecretsRoutes, status::ApiError},
    config::Limits,
    proto::{self, admin_service_server::AdminServiceServer},
};

/// How long an HTTP/2 ping may go unanswered before the connection (and
/// its watch streams) is dropped.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Why the server could not be built or stopped on an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("the server stopped: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves every service on `incoming` until `stop`, then lets the calls in
/// flight finish.
pub async fn serve<I, IO, IE>(
    context: ApiContext,
    health: HealthServer<impl Health>,
    limits: &Limits,
    calls: CallSlots,
    incoming: I,
    stop: CancellationToken,
) -> Result<(), ServerError>
where
    I: Stream<Item = Result<IO, IE>>,
    IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
    IE: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // Every stream holds a call slot of its connection from its headers on
    // (transport::gate); h2's own cap, advertised to peers, sits above
    // that, so that a peer ignoring the slots' answers can hold at most
    // twice the limit before h2 refuses streams itself.
    let stream_cap =
        u32::try_from(limits.max_calls_per_connection.saturating_mul(2)).unwrap_or(u32::MAX);
    Server::builder()
        .max_concurrent_streams(Some(stream_cap))
        .http2_keepalive_interval(Some(limits.keepalive_interval))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(GateLayer::new(
            limits.call_timeout,
            RequestBudget::new(limits.max_request_memory)
                .with_message_limit(limits.max_message_size),
            calls,
            context.metrics.clone(),
            stop.clone(),
        ))
        .layer(MapResponseLayer::new(too_large(limits.max_message_size)))
        // Every service takes the same message limit: tonic's default (4
        // MiB) would let health and reflection hold sixteen times more
        // per stream than the broker's own services.
        .add_service(health.max_decoding_message_size(limits.max_message_size))
        .add_service(
            reflection()
                .build_v1()?
                .max_decoding_message_size(limits.max_message_size),
        )
        .add_service(
            reflection()
                .build_v1alpha()?
                .max_decoding_message_size(limits.max_message_size),
        )
        .add_service(SecretsRoutes::new(
            SecretsApi::new(context.clone()),
            limits.max_message_size,
        ))
        .add_service(
            AdminServiceServer::new(AdminApi::new(context))
                .max_decoding_message_size(limits.max_message_size),
        )
        .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
        .await?;
    Ok(())
}

/// tonic answers a request over `max_decoding_message_size` with
/// OUT_OF_RANGE and a bare message; gRPC's convention (and our contract)
/// is RESOURCE_EXHAUSTED, with an `ErrorInfo` (`MESSAGE_TOO_LARGE`) that
/// names the setting. The broker's own handlers never answer
/// OUT_OF_RANGE, so the remap touches nothing else. The request body's
/// budget (`transport::budget`) refuses such a message before tonic reads
/// it; this keeps the contract should a body ever pass unbudgeted.
fn too_large<B: Default>(limit: usize) -> impl Fn(http::Response<B>) -> http::Response<B> + Clone {
    move |response| {
        let out_of_range = http::HeaderValue::from_static("11");
        if response.headers().get("grpc-status") == Some(&out_of_range) {
            return tonic::Status::from(ApiError::MessageTooLarge { limit }).into_http();
        }
        response
    }
}

/// Reflection knows the contract, health, and `google.rpc` error details,
/// so that grpcurl can decode the ErrorInfo of an error too.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
}
