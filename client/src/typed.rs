//! The typed configs as one generic call: each config names its RPC and
//! where the config sits in the response; `SecretsClient::get_config` does
//! the rest (deadline, retries, errors) once for all four.

use futures::future::BoxFuture;
use tonic::{Request, Response, Status, transport::Channel};

use crate::proto::{
    self, AwsServicesConfig, DatabaseConfig, JwtConfig, SecurityConfig,
    secrets_service_client::SecretsServiceClient,
};

/// A config the broker decodes for its callers.
pub trait TypedConfig: Sized + Send + 'static {
    /// The RPC's request (its default asks for `<environment>/<kind>`).
    type Request: Default + Clone + Send + 'static;
    /// The RPC's response.
    type Response: Send + 'static;

    /// The request for the config read from the secret `name` (empty: its
    /// default, `<environment>/<kind>`).
    fn request(name: &str) -> Self::Request;

    /// Sends the request.
    fn call(
        client: SecretsServiceClient<Channel>,
        request: Request<Self::Request>,
    ) -> BoxFuture<'static, Result<Response<Self::Response>, Status>>;

    /// The config in the response.
    fn config(response: Self::Response) -> Option<Self>;

    /// The full name and the version of the secret it was read from.
    fn source(response: &Self::Response) -> (&str, &str);

    /// The ARN of the secret it was read from (empty where the broker's
    /// backend has none): a secret created again under the name has
    /// another, and may reuse version ids.
    fn arn(response: &Self::Response) -> &str;
}

/// The four configs' RPCs.
macro_rules! typed_config {
    ($config:ty, $request:ident, $response:ident, $rpc:ident) => {
        impl TypedConfig for $config {
            type Request = proto::$request;
            type Response = proto::$response;

            fn request(name: &str) -> Self::Request {
                proto::$request {
                    name: name.to_owned(),
                    bypass_cache: false,
                }
            }

            fn call(
                mut client: SecretsServiceClient<Channel>,
                request: Request<Self::Request>,
            ) -> BoxFuture<'static, Result<Response<Self::Response>, Status>> {
                Box::pin(async move { client.$rpc(request).await })
            }

            fn config(response: Self::Response) -> Option<Self> {
                response.config
            }

            fn source(response: &Self::Response) -> (&str, &str) {
                (&response.name, &response.version_id)
            }

            fn arn(response: &Self::Response) -> &str {
                &response.arn
            }
        }
    };
}

typed_config!(
    JwtConfig,
    GetJwtConfigRequest,
    GetJwtConfigResponse,
    get_jwt_config
);
typed_config!(
    DatabaseConfig,
    GetDatabaseConfigRequest,
    GetDatabaseConfigResponse,
    get_database_config
);
typed_config!(
    AwsServicesConfig,
    GetAwsServicesConfigRequest,
    GetAwsServicesConfigResponse,
    get_aws_services_config
);
typed_config!(
    SecurityConfig,
    GetSecurityConfigRequest,
    GetSecurityConfigResponse,
    get_security_config
);
