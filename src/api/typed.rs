//! Typed configs: JSON secrets decoded and validated into the contract's
//! `JwtConfig`, `DatabaseConfig`, `AwsServicesConfig` and `SecurityConfig`.
//!
//! Fields are read one by one rather than through a derived `Deserialize`,
//! so that every failure names the field and the rule it broke, and so that
//! no error ever carries a piece of the value (serde's messages quote the
//! offending input).

use std::borrow::Cow;

use serde_json::{Map, Value};

use super::rpc::Rpc;
use crate::{
    cache::Lookup,
    proto::{
        AwsServicesConfig, DatabaseConfig, GetAwsServicesConfigRequest,
        GetAwsServicesConfigResponse, GetDatabaseConfigRequest, GetDatabaseConfigResponse,
        GetJwtConfigRequest, GetJwtConfigResponse, GetSecurityConfigRequest,
        GetSecurityConfigResponse, JwtConfig, SecurityConfig,
    },
    secret::SecretValue,
};

/// Why a secret could not be read as a typed config.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct Malformed {
    /// The field at fault; `None` when the secret as a whole is unusable.
    pub field: Option<&'static str>,
    /// The rule it broke, e.g. "must be a whole number greater than 0".
    pub rule: Cow<'static, str>,
}

impl Malformed {
    fn whole(rule: impl Into<Cow<'static, str>>) -> Self {
        Self {
            field: None,
            rule: rule.into(),
        }
    }

    fn field(field: &'static str, rule: &'static str) -> Self {
        Self {
            field: Some(field),
            rule: rule.into(),
        }
    }

    /// A secret that is not JSON at all. serde_json's syntax and
    /// end-of-input errors say what it expected and where (`expected value
    /// at line 1 column 9`, `number out of range at ...`, `recursion limit
    /// exceeded at ...`), never the text it read; any other kind of error
    /// could quote it, so only the position is said then.
    fn not_json(error: &serde_json::Error) -> Self {
        use serde_json::error::Category;
        match error.classify() {
            Category::Syntax | Category::Eof => Self::whole(format!("is not valid JSON: {error}")),
            Category::Io | Category::Data => Self::whole(format!(
                "is not valid JSON (at line {} column {})",
                error.line(),
                error.column()
            )),
        }
    }

    fn describe(&self) -> String {
        match self.field {
            Some(field) => format!("field {field} {}", self.rule),
            None => format!("the secret {}", self.rule),
        }
    }
}

/// A JSON object's fields, read with the rules of the typed configs.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(value: &SecretValue) -> Result<Self, Malformed> {
        let text = value
            .as_text()
            .ok_or(Malformed::whole("is binary, not a JSON object"))?;
        match serde_json::from_str(text) {
            Ok(Value::Object(map)) => Ok(Self(map)),
            Ok(Value::Array(_)) => Err(Malformed::whole("is a JSON array, not an object")),
            Ok(_) => Err(Malformed::whole("is a single JSON value, not an object")),
            Err(error) => Err(Malformed::not_json(&error)),
        }
    }

    fn get(&self, field: &'static str) -> Result<&Value, Malformed> {
        match self.0.get(field) {
            None | Some(Value::Null) => Err(Malformed::field(field, "is missing")),
            Some(value) => Ok(value),
        }
    }

    /// A non-empty string.
    fn text(&self, field: &'static str) -> Result<String, Malformed> {
        match self.get(field)? {
            Value::String(s) if !s.trim().is_empty() => Ok(s.clone()),
            Value::String(_) => Err(Malformed::field(field, "is empty")),
            _ => Err(Malformed::field(field, "must be a string")),
        }
    }

    /// A JSON number that is whole, from 1 to u32::MAX: `30`, and also
    /// `30.0` or `3e1` (what Python's json writes for a float), since the
    /// class this replaces handed the value on as it was. A quoted number
    /// is refused: callers use the field as a number without checking its
    /// type.
    fn positive(&self, field: &'static str) -> Result<u32, Malformed> {
        const RULE: &str = "must be a whole number from 1 to 4294967295";
        let value = self.get(field)?;
        if value.is_string() {
            // The Secrets Manager console's key/value editor stores every
            // value as a string: say what is wrong in those words.
            return Err(Malformed::field(
                field,
                "must be a JSON number, not a string (write it without quotes)",
            ));
        }
        let whole = match (value.as_u64(), value.as_f64()) {
            (Some(number), _) => u32::try_from(number).ok(),
            (None, Some(float)) if float.fract() == 0.0 && float <= f64::from(u32::MAX) => {
                // Whole and in range (a negative one is refused below).
                Some(float.max(0.0) as u32)
            }
            _ => None,
        };
        match whole {
            Some(n) if n > 0 => Ok(n),
            _ => Err(Malformed::field(field, RULE)),
        }
    }

    /// A JWS signing algorithm's registered name (case matters, as in the
    /// JWT libraries). `none` is refused: its tokens carry no signature,
    /// and a service that signs with this config would accept forged ones.
    fn jws_algorithm(&self, field: &'static str) -> Result<String, Malformed> {
        const KNOWN: [&str; 16] = [
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384", "PS512",
            "ES256", "ES384", "ES512", "ES256K", "EdDSA", "Ed25519", "Ed448",
        ];
        let name = self.text(field)?;
        if name.trim().eq_ignore_ascii_case("none") {
            return Err(Malformed::field(
                field,
                "must not be \"none\" (its tokens carry no signature)",
            ));
        }
        if !KNOWN.contains(&name.as_str()) {
            return Err(Malformed::field(
                field,
                "must be a JWS algorithm's name, such as HS256 (HS, RS, PS or ES with 256, 384 \
                 or 512; ES256K; EdDSA, Ed25519, Ed448)",
            ));
        }
        Ok(name)
    }

    /// An absolute http(s) URL.
    fn url(&self, field: &'static str) -> Result<String, Malformed> {
        let text = self.text(field)?;
        match url::Url::parse(&text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.has_host() => Ok(text),
            _ => Err(Malformed::field(field, "must be an absolute http(s) URL")),
        }
    }

    /// A list of strings, given as a JSON list or a comma-separated string;
    /// items are trimmed and empty ones dropped.
    fn list(&self, field: &'static str) -> Result<Vec<String>, Malformed> {
        const RULE: &str = "must be a list of strings or a comma-separated string";
        let items: Vec<&str> = match self.get(field)? {
            Value::String(joined) => joined.split(',').collect(),
            Value::Array(values) => values
                .iter()
                .map(|v| v.as_str().ok_or(Malformed::field(field, RULE)))
                .collect::<Result<_, _>>()?,
            _ => return Err(Malformed::field(field, RULE)),
        };
        Ok(items
            .into_iter()
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect())
    }
}

pub fn jwt_config(value: &SecretValue) -> Result<JwtConfig, Malformed> {
    let fields = Fields::parse(value)?;
    Ok(JwtConfig {
        jwt_secret_key: fields.text("jwt_secret_key")?,
        jwt_algorithm: fields.jws_algorithm("jwt_algorithm")?,
        jwt_issuer: fields.text("jwt_issuer")?,
        jwt_audience: fields.text("jwt_audience")?,
        jwt_access_token_expire_minutes: fields.positive("jwt_access_token_expire_minutes")?,
    })
}

pub fn database_config(value: &SecretValue) -> Result<DatabaseConfig, Malformed> {
    let fields = Fields::parse(value)?;
    Ok(DatabaseConfig {
        supabase_url: fields.url("supabase_url")?,
        supabase_anon_key: fields.text("supabase_anon_key")?,
        supabase_service_key: fields.text("supabase_service_key")?,
        database_password: fields.text("database_password")?,
    })
}

pub fn aws_services_config(value: &SecretValue) -> Result<AwsServicesConfig, Malformed> {
    let fields = Fields::parse(value)?;
    Ok(AwsServicesConfig {
        aws_ses_region: fields.text("aws_ses_region")?,
        aws_end_user_messaging_region: fields.text("aws_end_user_messaging_region")?,
        s3_bucket_name: fields.text("s3_bucket_name")?,
        max_file_size_mb: fields.positive("max_file_size_mb")?,
    })
}

pub fn security_config(value: &SecretValue) -> Result<SecurityConfig, Malformed> {
    let fields = Fields::parse(value)?;
    Ok(SecurityConfig {
        encryption_key: fields.text("encryption_key")?,
        encryption_salt: fields.text("encryption_salt")?,
        allowed_hosts: fields.list("allowed_hosts")?,
        cors_origins: fields.list("cors_origins")?,
    })
}

/// One typed-config RPC: its request, the config it decodes, its response.
/// Each of the four is a few constants and two functions; the handler that
/// serves them is one (`SecretsApi::typed_config`).
pub trait TypedConfigRpc: Send + 'static {
    /// The decoded config.
    type Config;
    /// The RPC's response.
    type Response;
    /// The RPC, for the audit trail and the metrics.
    const RPC: Rpc;
    /// The last part of the default name: `<environment>/<KIND>`.
    const KIND: &'static str;
    /// How errors name the config ("a JWT config").
    const LABEL: &'static str;

    /// The requested name (empty: the default).
    fn name(&self) -> &str;
    fn bypass_cache(&self) -> bool;
    fn decode(value: &SecretValue) -> Result<Self::Config, Malformed>;
    /// The response: the config, which version of which secret it was
    /// read from, and the cache facts of that read.
    fn respond(config: Self::Config, lookup: &Lookup) -> Self::Response;
}

/// The four typed configs' constants and functions.
macro_rules! typed_config_rpc {
    ($request:ty, $config:ty, $response:ident, $rpc:ident, $kind:literal, $label:literal, $decode:ident) => {
        impl TypedConfigRpc for $request {
            type Config = $config;
            type Response = $response;
            const RPC: Rpc = Rpc::$rpc;
            const KIND: &'static str = $kind;
            const LABEL: &'static str = $label;

            fn name(&self) -> &str {
                &self.name
            }

            fn bypass_cache(&self) -> bool {
                self.bypass_cache
            }

            fn decode(value: &SecretValue) -> Result<$config, Malformed> {
                $decode(value)
            }

            fn respond(config: $config, lookup: &Lookup) -> $response {
                let version = &lookup.version;
                $response {
                    config: Some(config),
                    version_id: version.version_id.clone(),
                    name: version.name.clone(),
                    arn: version.arn.clone(),
                    cache: Some(super::message::cache_info(lookup)),
                }
            }
        }
    };
}

typed_config_rpc!(
    GetJwtConfigRequest,
    JwtConfig,
    GetJwtConfigResponse,
    GetJwtConfig,
    "jwt",
    "a JWT config",
    jwt_config
);
typed_config_rpc!(
    GetDatabaseConfigRequest,
    DatabaseConfig,
    GetDatabaseConfigResponse,
    GetDatabaseConfig,
    "database",
    "a database config",
    database_config
);
typed_config_rpc!(
    GetAwsServicesConfigRequest,
    AwsServicesConfig,
    GetAwsServicesConfigResponse,
    GetAwsServicesConfig,
    "aws-services",
    "an AWS services config",
    aws_services_config
);
typed_config_rpc!(
    GetSecurityConfigRequest,
    SecurityConfig,
    GetSecurityConfigResponse,
    GetSecurityConfig,
    "security",
    "a security config",
    security_config
);

#[cfg(test)]
mod tests {
    use super::*;

    fn json(value: serde_json::Value) -> SecretValue {
        SecretValue::text(value.to_string())
    }

    fn jwt(overrides: serde_json::Value) -> Result<JwtConfig, Malformed> {
        let mut base = serde_json::json!({
            "jwt_secret_key": "k-SECRET", "jwt_algorithm": "HS256", "jwt_issuer": "i",
            "jwt_audience": "a", "jwt_access_token_expire_minutes": 30
        });
        for (k, v) in overrides.as_object().unwrap() {
            if v.is_null() {
                base.as_object_mut().unwrap().remove(k);
            } else {
                base[k] = v.clone();
            }
        }
        jwt_config(&json(base))
    }

    #[test]
    fn a_good_jwt_config_decodes() {
        let config = jwt(serde_json::json!({})).unwrap();
        assert_eq!(config.jwt_access_token_expire_minutes, 30);
        assert_eq!(config.jwt_secret_key, "k-SECRET");
    }

    #[test]
    fn whole_numbers_written_as_floats_are_taken() {
        let minutes = |text: &str| {
            let value: serde_json::Value = serde_json::from_str(text).unwrap();
            jwt(serde_json::json!({ "jwt_access_token_expire_minutes": value }))
                .map(|config| config.jwt_access_token_expire_minutes)
        };
        assert_eq!(minutes("30.0"), Ok(30));
        assert_eq!(minutes("1e1"), Ok(10));
        assert_eq!(minutes("4294967295.0"), Ok(u32::MAX));
        for refused in ["-1.0", "0.0", "4294967296.0", "5e9", "1e300", "2.5"] {
            let error = minutes(refused).unwrap_err();
            assert_eq!(
                error.rule, "must be a whole number from 1 to 4294967295",
                "{refused}"
            );
        }
    }

    #[test]
    fn each_broken_rule_names_its_field() {
        let cases = [
            (
                serde_json::json!({"jwt_issuer": null}),
                "jwt_issuer",
                "is missing",
            ),
            (
                serde_json::json!({"jwt_issuer": ""}),
                "jwt_issuer",
                "is empty",
            ),
            (
                serde_json::json!({"jwt_algorithm": "none"}),
                "jwt_algorithm",
                "must not be \"none\"",
            ),
            (
                serde_json::json!({"jwt_algorithm": "hs256"}),
                "jwt_algorithm",
                "such as HS256",
            ),
            (
                serde_json::json!({"jwt_audience": 5}),
                "jwt_audience",
                "must be a string",
            ),
            (
                serde_json::json!({"jwt_access_token_expire_minutes": 0}),
                "jwt_access_token_expire_minutes",
                "from 1 to 4294967295",
            ),
            (
                serde_json::json!({"jwt_access_token_expire_minutes": "30"}),
                "jwt_access_token_expire_minutes",
                "must be a JSON number, not a string",
            ),
            (
                serde_json::json!({"jwt_access_token_expire_minutes": 1.5}),
                "jwt_access_token_expire_minutes",
                "from 1 to 4294967295",
            ),
        ];
        for (overrides, field, rule) in cases {
            let err = jwt(overrides).unwrap_err();
            assert_eq!(err.field, Some(field));
            assert!(err.to_string().contains(rule), "{err}");
        }
    }

    #[test]
    fn non_json_and_binary_secrets_are_malformed_as_a_whole() {
        let err = jwt_config(&SecretValue::text("plain-SECRET-text")).unwrap_err();
        assert_eq!(err.field, None);
        assert!(!err.to_string().contains("SECRET"));
        let err = security_config(&json(serde_json::json!(["a"]))).unwrap_err();
        assert_eq!(err, Malformed::whole("is a JSON array, not an object"));
        let err = database_config(&SecretValue::binary(b"{}".to_vec())).unwrap_err();
        assert_eq!(err.field, None);
    }

    #[test]
    fn json_the_parser_refuses_is_not_called_a_non_object() {
        // Objects Python's json reads, which serde_json does not: the
        // error says why and where, never the text.
        let deep = format!(
            r#"{{"SECRET-deep": {}1{}}}"#,
            "[".repeat(200),
            "]".repeat(200)
        );
        let cases = [
            (
                r#"{"jwt_access_token_expire_minutes": 1e400}"#,
                "number out of range at line 1",
            ),
            (
                r#"{"SECRET-nan": NaN}"#,
                "expected value at line 1 column 16",
            ),
            (r#"{"SECRET-x": "\ud800"}"#, "at line 1"),
            (deep.as_str(), "recursion limit exceeded at line 1"),
            (r#"{"SECRET-cut": "#, "EOF while parsing a value at line 1"),
        ];
        for (text, said) in cases {
            let err = jwt_config(&SecretValue::text(text)).unwrap_err();
            assert_eq!(err.field, None, "{text}");
            let shown = err.to_string();
            assert!(
                shown.starts_with("the secret is not valid JSON: "),
                "{shown}"
            );
            assert!(shown.contains(said), "{shown}");
            assert!(!shown.contains("SECRET"), "{shown}");
        }
    }

    #[test]
    fn max_file_size_must_be_a_positive_integer() {
        let config = |size: serde_json::Value| {
            aws_services_config(&json(serde_json::json!({
                "aws_ses_region": "r", "aws_end_user_messaging_region": "r",
                "s3_bucket_name": "b", "max_file_size_mb": size
            })))
        };
        assert_eq!(config(serde_json::json!(25)).unwrap().max_file_size_mb, 25);
        for bad in [
            serde_json::json!(-1),
            serde_json::json!("10"),
            serde_json::json!(0),
            serde_json::json!(5_000_000_000u64),
        ] {
            assert_eq!(config(bad).unwrap_err().field, Some("max_file_size_mb"));
        }
    }

    #[test]
    fn supabase_url_must_be_a_url() {
        let config = |url: &str| {
            database_config(&json(serde_json::json!({
                "supabase_url": url, "supabase_anon_key": "a",
                "supabase_service_key": "s", "database_password": "p"
            })))
        };
        assert!(config("https://x.supabase.co").is_ok());
        for bad in [
            "not a url",
            "x.supabase.co",
            "mailto:a@b.c",
            "file:///etc/passwd",
        ] {
            assert_eq!(
                config(bad).unwrap_err().field,
                Some("supabase_url"),
                "{bad}"
            );
        }
    }

    #[test]
    fn lists_come_from_json_lists_or_comma_strings() {
        let config = |hosts: serde_json::Value| {
            security_config(&json(serde_json::json!({
                "encryption_key": "k", "encryption_salt": "s",
                "allowed_hosts": hosts, "cors_origins": ["https://a", " https://b "]
            })))
        };
        let from_string = config(serde_json::json!("a.com, b.com,,")).unwrap();
        assert_eq!(from_string.allowed_hosts, ["a.com", "b.com"]);
        assert_eq!(from_string.cors_origins, ["https://a", "https://b"]);
        assert_eq!(
            config(serde_json::json!(["x"])).unwrap().allowed_hosts,
            ["x"]
        );
        assert_eq!(
            config(serde_json::json!([1])).unwrap_err().field,
            Some("allowed_hosts")
        );
        assert_eq!(
            config(serde_json::json!(7)).unwrap_err().field,
            Some("allowed_hosts")
        );
    }
}
