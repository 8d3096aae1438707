//! The broker's own RPCs, as the metrics and the audit trail name them.
//!
//! The list of variants is the one source: `Rpc::COUNT` and the names come
//! from it at compile time (strum), so a new RPC cannot be left out of the
//! per-RPC metric handles.

use strum::{EnumCount, EnumIter, IntoEnumIterator, IntoStaticStr};

/// One RPC of SecretsService or AdminService.
#[derive(Debug, Clone, Copy, PartialEq, Eq, EnumCount, EnumIter, IntoStaticStr)]
pub enum Rpc {
    GetSecret,
    BatchGetSecrets,
    GetJwtConfig,
    GetDatabaseConfig,
    GetAwsServicesConfig,
    GetSecurityConfig,
    WatchSecret,
    GetCacheStats,
    ClearCache,
    RefreshSecret,
    CheckUpstream,
}

impl Rpc {
    /// The RPC's name in the contract.
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// The RPC a request's path calls, when it is one of the broker's: the
    /// method under its own service (`SecretsService/ClearCache` is no
    /// RPC of the broker's, and must not be audited as ClearCache).
    pub fn of_path(path: &str) -> Option<Self> {
        let (admin, method) = match path.strip_prefix("/secretsbroker.v1.SecretsService/") {
            Some(method) => (false, method),
            None => (true, path.strip_prefix("/secretsbroker.v1.AdminService/")?),
        };
        Self::iter().find(|rpc| rpc.name() == method && rpc.is_admin() == admin)
    }

    /// Whether it is AdminService's.
    pub fn is_admin(self) -> bool {
        matches!(
            self,
            Self::GetCacheStats | Self::ClearCache | Self::RefreshSecret | Self::CheckUpstream
        )
    }

    /// Its place among the variants, below `Rpc::COUNT`.
    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use strum::IntoEnumIterator;

    use super::*;

    #[test]
    fn every_variant_has_a_place_below_the_count_and_its_contract_name() {
        for (place, rpc) in Rpc::iter().enumerate() {
            assert_eq!(rpc.index(), place);
            assert!(rpc.index() < Rpc::COUNT);
        }
        assert_eq!(Rpc::GetAwsServicesConfig.name(), "GetAwsServicesConfig");
    }

    #[test]
    fn a_method_is_found_under_its_own_service_only() {
        assert_eq!(
            Rpc::of_path("/secretsbroker.v1.AdminService/ClearCache"),
            Some(Rpc::ClearCache)
        );
        assert_eq!(
            Rpc::of_path("/secretsbroker.v1.SecretsService/GetSecret"),
            Some(Rpc::GetSecret)
        );
        assert_eq!(
            Rpc::of_path("/secretsbroker.v1.SecretsService/ClearCache"),
            None
        );
        assert_eq!(
            Rpc::of_path("/secretsbroker.v1.AdminService/GetSecret"),
            None
        );
    }
}
