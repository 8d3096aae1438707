//! `Debug` for the generated messages that carry secret values: every
//! field is shown except the secret ones, which print `<redacted>`. The
//! broker and the client use these same message types, so neither side can
//! print a value by accident.

use std::fmt;

use zeroize::Zeroize;

use crate::proto::{AwsServicesConfig, DatabaseConfig, JwtConfig, Secret, SecurityConfig, secret};

const REDACTED: &str = "<redacted>";

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = match &self.value {
            Some(secret::Value::StringValue(text)) => format!("text, {} bytes", text.len()),
            Some(secret::Value::BinaryValue(bytes)) => format!("binary, {} bytes", bytes.len()),
            None => "none".to_owned(),
        };
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("arn", &self.arn)
            .field("version_id", &self.version_id)
            .field("version_stages", &self.version_stages)
            .field("created_date", &self.created_date)
            .field("value", &format_args!("{REDACTED} ({value})"))
            .field("cache", &self.cache)
            .finish()
    }
}

impl fmt::Debug for JwtConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JwtConfig")
            .field("jwt_secret_key", &REDACTED)
            .field("jwt_algorithm", &self.jwt_algorithm)
            .field("jwt_issuer", &self.jwt_issuer)
            .field("jwt_audience", &self.jwt_audience)
            .field(
                "jwt_access_token_expire_minutes",
                &self.jwt_access_token_expire_minutes,
            )
            .finish()
    }
}

impl fmt::Debug for DatabaseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DatabaseConfig")
            .field("supabase_url", &without_userinfo(&self.supabase_url))
            .field("supabase_anon_key", &REDACTED)
            .field("supabase_service_key", &REDACTED)
            .field("database_password", &REDACTED)
            .finish()
    }
}

/// A URL as `Debug` shows it: a user and password in it
/// (`https://user:pass@host/`) are a credential, and print `<redacted>`.
/// A password may hold `/`, `?` or `#` unescaped, so whatever precedes
/// the last `@` goes (an `@` in a path or query costs the host, in Debug
/// only).
fn without_userinfo(url: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |at| at + 3);
    match url[after_scheme..].rfind('@') {
        Some(at) => format!(
            "{}{REDACTED}{}",
            &url[..after_scheme],
            &url[after_scheme + at..]
        ),
        None => url.to_owned(),
    }
}

impl fmt::Debug for SecurityConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecurityConfig")
            .field("encryption_key", &REDACTED)
            .field("encryption_salt", &REDACTED)
            .field("allowed_hosts", &self.allowed_hosts)
            .field("cors_origins", &self.cors_origins)
            .finish()
    }
}

/// The typed configs can be wiped: a client that holds one in memory
/// (`secrets-broker-client`'s cache) wipes it when it lets it go.
impl Zeroize for JwtConfig {
    fn zeroize(&mut self) {
        self.jwt_secret_key.zeroize();
        self.jwt_algorithm.zeroize();
        self.jwt_issuer.zeroize();
        self.jwt_audience.zeroize();
        self.jwt_access_token_expire_minutes.zeroize();
    }
}

impl Zeroize for DatabaseConfig {
    fn zeroize(&mut self) {
        self.supabase_url.zeroize();
        self.supabase_anon_key.zeroize();
        self.supabase_service_key.zeroize();
        self.database_password.zeroize();
    }
}

impl Zeroize for SecurityConfig {
    fn zeroize(&mut self) {
        self.encryption_key.zeroize();
        self.encryption_salt.zeroize();
        self.allowed_hosts.zeroize();
        self.cors_origins.zeroize();
    }
}

impl Zeroize for AwsServicesConfig {
    fn zeroize(&mut self) {
        self.aws_ses_region.zeroize();
        self.aws_end_user_messaging_region.zeroize();
        self.s3_bucket_name.zeroize();
        self.max_file_size_mb.zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_fields_never_print() {
        let shown = format!(
            "{:?} {:?} {:?} {:?}",
            Secret {
                name: "insurecove/x".into(),
                value: Some(secret::Value::StringValue("hunter2-A".into())),
                ..Default::default()
            },
            JwtConfig {
                jwt_secret_key: "hunter2-B".into(),
                jwt_issuer: "issuer".into(),
                ..Default::default()
            },
            DatabaseConfig {
                supabase_url: "postgresql://postgres:hunter2-U/?#@db.x.supabase.co:5432/db".into(),
                supabase_anon_key: "hunter2-C".into(),
                supabase_service_key: "hunter2-D".into(),
                database_password: "hunter2-E".into(),
            },
            SecurityConfig {
                encryption_key: "hunter2-F".into(),
                encryption_salt: "hunter2-G".into(),
                ..Default::default()
            },
        );
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("insurecove/x") && shown.contains("issuer"),
            "{shown}"
        );
        assert!(shown.contains("text, 9 bytes"), "{shown}");
        assert!(
            shown.contains("postgresql://<redacted>@db.x.supabase.co:5432/db"),
            "{shown}"
        );
    }

    #[test]
    fn a_url_without_a_user_shows_whole() {
        for url in ["https://x.supabase.co", "https://x.supabase.co/a", "x"] {
            assert_eq!(without_userinfo(url), url);
        }
        assert_eq!(without_userinfo("u:p@host"), "<redacted>@host");
    }

    #[test]
    fn typed_configs_can_be_wiped() {
        let mut config = JwtConfig {
            jwt_secret_key: "hunter2-Z".into(),
            jwt_access_token_expire_minutes: 30,
            ..Default::default()
        };
        config.zeroize();
        assert_eq!(config, JwtConfig::default());
    }
}
