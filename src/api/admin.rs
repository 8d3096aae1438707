//! AdminService: what operators call to inspect and steer the cache.

use std::time::Instant;

use tonic::{Request, Response, Status};

use super::{
    ApiContext,
    message::{self, Contents},
    status::ApiError,
};
use crate::{
    backend::VersionSelector,
    cache::{CacheKey, Lookup},
    proto::{
        CheckUpstreamRequest, CheckUpstreamResponse, ClearCacheRequest, ClearCacheResponse,
        GetCacheStatsRequest, GetCacheStatsResponse, RefreshSecretRequest, RefreshSecretResponse,
        admin_service_server::AdminService,
    },
};

/// The AdminService implementation.
pub struct AdminApi {
    context: ApiContext,
}

impl AdminApi {
    pub fn new(context: ApiContext) -> Self {
        Self { context }
    }

    fn clear_cache(&self, names: &[String]) -> Result<ClearCacheResponse, ApiError> {
        let full_names = names
            .iter()
            .map(|name| self.context.names.resolve(name))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ClearCacheResponse {
            cleared: self.context.cache.clear(&full_names),
        })
    }

    async fn refresh_secret(&self, name: &str) -> Result<RefreshSecretResponse, ApiError> {
        let full_name = self.context.names.resolve(name)?;
        let key = CacheKey::new(full_name, VersionSelector::current());
        let (version, changed) = self.context.cache.refresh(key).await?;
        let lookup = Lookup {
            version,
            hit: false,
            age: std::time::Duration::ZERO,
            stale: false,
        };
        Ok(RefreshSecretResponse {
            secret: Some(message::secret(&lookup, Contents::MetadataOnly)),
            changed,
        })
    }
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn get_cache_stats(
        &self,
        _request: Request<GetCacheStatsRequest>,
    ) -> Result<Response<GetCacheStatsResponse>, Status> {
        let stats = self.context.cache.stats();
        let watch = self.context.watch.stats();
        Ok(Response::new(GetCacheStatsResponse {
            total_entries: stats.total_entries,
            valid_entries: stats.valid_entries,
            expired_entries: stats.expired_entries,
            hits: stats.hits,
            misses: stats.misses,
            coalesced: stats.coalesced,
            stale_served: stats.stale_served,
            upstream_calls: stats.upstream_calls,
            upstream_errors: stats.upstream_errors,
            evictions: stats.evictions,
            watchers: watch.watchers,
            hit_ratio: stats.hit_ratio(),
            watched_secrets: watch.watched_secrets,
            watch_rounds: watch.rounds,
            watch_upstream_calls: watch.upstream_calls,
        }))
    }

    async fn clear_cache(
        &self,
        request: Request<ClearCacheRequest>,
    ) -> Result<Response<ClearCacheResponse>, Status> {
        self.clear_cache(&request.into_inner().names)
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn refresh_secret(
        &self,
        request: Request<RefreshSecretRequest>,
    ) -> Result<Response<RefreshSecretResponse>, Status> {
        self.refresh_secret(&request.into_inner().name)
            .await
            .map(Response::new)
            .map_err(Status::from)
    }

    async fn check_upstream(
        &self,
        _request: Request<CheckUpstreamRequest>,
    ) -> Result<Response<CheckUpstreamResponse>, Status> {
        let started = Instant::now();
        let outcome = self.context.cache.store().check().await;
        let latency = prost_types::Duration::try_from(started.elapsed()).ok();
        let (reachable, detail) = match outcome {
            Ok(detail) => (true, detail),
            Err(error) => (false, error.to_string()),
        };
        Ok(Response::new(CheckUpstreamResponse {
            reachable,
            detail,
            latency,
        }))
    }
}
