//! SecretsService as the server mounts it.
//!
//! GetSecret is nearly every call the broker serves, and a cached one
//! awaits nothing. The generated server would still box two futures for
//! it (its method's and `async_trait`'s) and move the call through both;
//! here GetSecret is routed to a method service whose hit is a ready
//! answer, and only a read through the cache is boxed. tonic's `Grpc`
//! still decodes the request and encodes the answer, as for every other
//! method, which goes to the generated server unchanged.

use std::{
    convert::Infallible,
    sync::Arc,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either, Ready, ready};
use tonic::{
    Request, Response, Status,
    body::Body,
    server::{Grpc, NamedService, UnaryService},
};
use tonic_prost::ProstCodec;

use super::secrets::{GetSecretCall, SecretsApi};
use crate::proto::{
    GetSecretRequest,
    secrets_service_server::{SERVICE_NAME, SecretsServiceServer},
};
use secrets_broker_contract::encoded::EncodedGetSecretResponse;

/// GetSecret's path: the contract's, as the generated server matches it.
const GET_SECRET: &str = "/secretsbroker.v1.SecretsService/GetSecret";

/// The SecretsService: GetSecret here, the other methods generated.
#[derive(Clone)]
pub struct SecretsRoutes {
    api: Arc<SecretsApi>,
    generated: SecretsServiceServer<SecretsApi>,
    max_message_size: usize,
}

impl SecretsRoutes {
    /// Every method decodes at most `max_message_size` bytes a message.
    pub fn new(api: SecretsApi, max_message_size: usize) -> Self {
        let api = Arc::new(api);
        let generated = SecretsServiceServer::from_arc(Arc::clone(&api))
            .max_decoding_message_size(max_message_size);
        Self {
            api,
            generated,
            max_message_size,
        }
    }
}

impl NamedService for SecretsRoutes {
    const NAME: &'static str = SERVICE_NAME;
}

type Answer = Result<Response<EncodedGetSecretResponse>, Status>;

/// GetSecret as tonic's `Grpc::unary` calls it, once the request is
/// decoded.
struct GetSecretMethod(Arc<SecretsApi>);

impl UnaryService<GetSecretRequest> for GetSecretMethod {
    type Response = EncodedGetSecretResponse;
    type Future = Either<Ready<Answer>, BoxFuture<'static, Answer>>;

    fn call(&mut self, request: Request<GetSecretRequest>) -> Self::Future {
        match self.0.get_secret_now(request) {
            GetSecretCall::Done(answer) => Either::Left(ready(answer)),
            GetSecretCall::Read(read) => {
                let api = Arc::clone(&self.0);
                Either::Right(Box::pin(async move { api.get_secret_read(read).await }))
            }
        }
    }
}

impl<B> tower::Service<http::Request<B>> for SecretsRoutes
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != GET_SECRET {
            return self.generated.call(request);
        }
        let method = GetSecretMethod(Arc::clone(&self.api));
        let max_message_size = self.max_message_size;
        Box::pin(async move {
            let mut grpc = Grpc::new(ProstCodec::default())
                .apply_max_message_size_config(Some(max_message_size), None);
            Ok(grpc.unary(method, request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::{
        alloc_count::allocations_in, api::secrets::tests::api_holding_db, policy::Authorizer,
    };

    fn request(name: &str) -> Request<GetSecretRequest> {
        Request::new(GetSecretRequest {
            name: name.into(),
            ..GetSecretRequest::default()
        })
    }

    #[test]
    fn a_cached_get_secret_is_answered_at_once_without_allocating() {
        let (runtime, api) = api_holding_db(Authorizer::new(None, false).unwrap());
        let _entered = runtime.enter();
        let mut method = GetSecretMethod(Arc::new(api));
        // The first answer from the cache encodes the secret once.
        let first = method.call(request("db")).now_or_never().unwrap();
        assert!(first.unwrap().into_inner().cache().hit);

        let next = request("db");
        let (answer, allocations) = allocations_in(|| method.call(next));
        assert_eq!(allocations, 0, "no future is boxed for a hit");
        let Either::Left(answer) = answer else {
            panic!("a hit is a ready answer, not a read");
        };
        let answer = answer.now_or_never().unwrap().unwrap().into_inner();
        assert!(answer.cache().hit);
    }

    #[test]
    fn a_get_secret_the_cache_cannot_answer_is_read_through_it() {
        let (runtime, api) = api_holding_db(Authorizer::new(None, false).unwrap());
        let mut method = GetSecretMethod(Arc::new(api));
        let mut bypass = request("db");
        bypass.get_mut().bypass_cache = true;
        let answer = {
            let _entered = runtime.enter();
            method.call(bypass)
        };
        assert!(matches!(answer, Either::Right(_)), "a bypass is read");
        let answer = runtime.block_on(answer).unwrap().into_inner();
        assert!(!answer.cache().hit);

        let refused = {
            let _entered = runtime.enter();
            method.call(request("bad name!"))
        };
        let Either::Left(refused) = refused else {
            panic!("a bad name is refused at once");
        };
        let status = refused.now_or_never().unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
