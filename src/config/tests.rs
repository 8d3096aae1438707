use std::collections::HashMap;

use super::*;

fn resolve(args: &BrokerArgs, env: &[(&str, &str)]) -> Result<Settings, ConfigError> {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    Settings::resolve(args, &move |name| env.get(name).cloned())
}

fn dev() -> BrokerArgs {
    BrokerArgs {
        dev: true,
        ..BrokerArgs::default()
    }
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn defaults_are_those_services_already_use() {
    let settings = resolve(&BrokerArgs::default(), &[]).unwrap();
    assert_eq!(
        settings.listen,
        ListenAddr::Tcp("127.0.0.1:50051".parse().unwrap())
    );
    assert_eq!(settings.secret_prefix, "insurecove");
    assert_eq!(settings.environment, "production");
    assert_eq!(settings.cache.ttl, Duration::from_secs(300));
    assert_eq!(settings.cache.max_entries, 10_000);
    assert_eq!(settings.cache.max_stale, Duration::from_secs(3600));
    assert_eq!(settings.cache.upstream_wait, Duration::from_secs(1));
    assert_eq!(settings.cache.negative_ttl, Duration::from_secs(30));
    assert_eq!(settings.cache.upstream.concurrency, 32);
    assert_eq!(settings.cache.upstream.queue, 1000);
    assert_eq!(settings.watch_interval, Duration::from_secs(30));
    assert_eq!(settings.log_level, "info");
    assert_eq!(
        settings.backend,
        BackendChoice::Aws {
            region: "ap-east-1".into()
        }
    );
    assert_eq!(settings.tls, None);
}

#[test]
fn flags_beat_env_which_beats_the_file() {
    let file =
        config_file("cache_ttl = 10\nsecret_prefix = \"from-file\"\nenvironment = \"staging\"\n");
    let path = file.path().to_str().unwrap();
    let env = [
        ("BROKER_CONFIG", path),
        ("SECRET_CACHE_TTL", "20"),
        ("SECRET_PREFIX", "from-env"),
    ];
    let mut args = dev();
    args.secret_prefix = Some("from-flag".into());
    let settings = resolve(&args, &env).unwrap();
    assert_eq!(settings.secret_prefix, "from-flag");
    assert_eq!(settings.cache.ttl, Duration::from_secs(20));
    assert_eq!(settings.environment, "staging");
    assert_eq!(settings.config_file.as_deref(), Some(file.path()));
}

#[test]
fn the_sdks_switch_to_log_answer_bodies_stops_the_start() {
    let err = resolve(&dev(), &[("LOG_SENSITIVE_BODIES", "True")]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("LOG_SENSITIVE_BODIES: makes the AWS SDK log"),
        "{err}"
    );
    // The SDK reads only "true": other values change nothing.
    resolve(&dev(), &[("LOG_SENSITIVE_BODIES", "false")]).unwrap();
}

#[test]
fn errors_name_where_the_value_came_from() {
    let err = resolve(&dev(), &[("SECRET_CACHE_TTL", "soon")]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("SECRET_CACHE_TTL: \"soon\" is not a duration"),
        "{err}"
    );

    let mut args = dev();
    args.cache_max_entries = Some("0".into());
    let err = resolve(&args, &[]).unwrap_err().to_string();
    assert!(err.starts_with("--cache-max-entries:"), "{err}");

    let file = config_file("watch_interval = \"500ms\"\n");
    let err = resolve(&dev(), &[("BROKER_CONFIG", file.path().to_str().unwrap())])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("watch_interval in "), "{err}");
    assert!(err.contains("at least 1 second"), "{err}");
}

#[test]
fn unknown_file_keys_are_refused() {
    let file = config_file("cache_tll = 5\n");
    let err = resolve(&dev(), &[("BROKER_CONFIG", file.path().to_str().unwrap())])
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown setting `cache_tll`"), "{err}");
}

#[test]
fn plaintext_is_refused_beyond_loopback() {
    let mut args = dev();
    args.listen = Some("0.0.0.0:50051".into());
    let err = resolve(&args, &[]).unwrap_err().to_string();
    assert!(err.contains("without TLS"), "{err}");

    args.listen = Some("[::1]:50051".into());
    assert!(resolve(&args, &[]).is_ok());
    args.listen = Some("unix:/tmp/broker.sock".into());
    assert_eq!(
        resolve(&args, &[]).unwrap().listen,
        ListenAddr::Unix("/tmp/broker.sock".into())
    );
    args.listen = Some("localhost:50061".into());
    assert_eq!(
        resolve(&args, &[]).unwrap().listen,
        ListenAddr::Tcp("127.0.0.1:50061".parse().unwrap())
    );
    args.listen = Some("broker.internal:50061".into());
    let err = resolve(&args, &[]).unwrap_err().to_string();
    assert!(
        err.contains("IP:PORT") && err.contains("localhost:PORT"),
        "{err}"
    );
}

#[test]
fn tls_needs_all_three_files() {
    let mut args = dev();
    args.tls_cert = Some("cert.pem".into());
    let err = resolve(&args, &[("BROKER_TLS_KEY", "key.pem")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing: --tls-client-ca"), "{err}");
    assert!(!err.contains("--tls-key ("), "{err}");

    args.listen = Some("0.0.0.0:50051".into());
    let settings = resolve(
        &args,
        &[
            ("BROKER_TLS_KEY", "key.pem"),
            ("BROKER_TLS_CLIENT_CA", "ca.pem"),
        ],
    )
    .unwrap();
    assert_eq!(settings.tls.unwrap().client_ca, PathBuf::from("ca.pem"));
}

#[test]
fn values_in_other_forms() {
    let settings = resolve(
        &dev(),
        &[
            ("SECRET_CACHE_TTL", "5m"),
            ("LOG_LEVEL", "WARNING"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
        ],
    )
    .unwrap();
    assert_eq!(settings.cache.ttl, Duration::from_secs(300));
    assert_eq!(settings.log_level, "warn");
    assert_eq!(settings.backend, BackendChoice::Dev);

    let aws = resolve(&BrokerArgs::default(), &[("AWS_REGION", "us-east-2")]).unwrap();
    assert_eq!(
        aws.backend,
        BackendChoice::Aws {
            region: "us-east-2".into()
        }
    );
    let err = resolve(&dev(), &[("LOG_LEVEL", "loud")])
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("LOG_LEVEL:"), "{err}");
}

#[test]
fn the_log_format_is_text_or_json_and_nothing_else() {
    assert!(!resolve(&dev(), &[]).unwrap().log_json);
    assert!(resolve(&dev(), &[("LOG_FORMAT", "JSON")]).unwrap().log_json);
    assert!(!resolve(&dev(), &[("LOG_FORMAT", "text")]).unwrap().log_json);
    for bad in ["xml", "jsonl"] {
        let err = resolve(&dev(), &[("LOG_FORMAT", bad)])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("LOG_FORMAT:"), "{bad:?}: {err}");
    }
}

#[test]
fn a_secrets_file_selects_the_file_backend() {
    let settings = resolve(&BrokerArgs::default(), &[("BROKER_SECRETS_FILE", "s.json")]).unwrap();
    assert_eq!(
        settings.backend,
        BackendChoice::File {
            path: "s.json".into()
        }
    );
}

#[test]
fn absurd_values_are_refused_before_they_can_overflow() {
    let err = resolve(
        &dev(),
        &[("BROKER_MAX_CONNECTIONS", "18446744073709551615")],
    )
    .unwrap_err()
    .to_string();
    assert!(err.starts_with("BROKER_MAX_CONNECTIONS:"), "{err}");
    let err = resolve(
        &dev(),
        &[("SECRET_CACHE_MAX_STALE", "18446744073709551615")],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("longer than a year"), "{err}");
}

#[test]
fn the_request_memory_must_hold_one_largest_request() {
    let err = resolve(
        &dev(),
        &[
            ("BROKER_MAX_MESSAGE_SIZE", "1024"),
            ("BROKER_MAX_REQUEST_MEMORY", "1028"),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("BROKER_MAX_REQUEST_MEMORY, max_request_memory) of 1028"),
        "{err}"
    );
    assert!(
        err.contains("--max-message-size (BROKER_MAX_MESSAGE_SIZE"),
        "{err}"
    );
    let fits = resolve(
        &dev(),
        &[
            ("BROKER_MAX_MESSAGE_SIZE", "1024"),
            ("BROKER_MAX_REQUEST_MEMORY", "1029"),
        ],
    )
    .unwrap();
    assert_eq!(fits.limits.max_request_memory, 1029);
}

#[test]
fn limits_have_defaults_and_sources() {
    let settings = resolve(&dev(), &[("BROKER_MAX_MESSAGE_SIZE", "1024")]).unwrap();
    assert_eq!(settings.limits.max_message_size, 1024);
    assert_eq!(settings.limits.max_connections, 10_000);
    assert_eq!(settings.limits.max_calls_per_connection, 1024);
    assert_eq!(settings.limits.max_request_memory, 64 << 20);
    assert_eq!(settings.limits.call_timeout, Duration::from_secs(30));
    assert_eq!(settings.limits.shutdown_grace, Duration::from_secs(10));
    assert!(!settings.metrics_secret_names);

    let mut args = dev();
    args.metrics_secret_names = Some("true".into());
    args.call_timeout = Some("0".into());
    let err = resolve(&args, &[]).unwrap_err().to_string();
    assert!(err.starts_with("--call-timeout:"), "{err}");
    args.call_timeout = None;
    assert!(resolve(&args, &[]).unwrap().metrics_secret_names);
}

#[test]
fn tls_on_a_unix_socket_is_refused_by_the_config() {
    let mut args = dev();
    args.listen = Some("unix:/tmp/broker.sock".into());
    args.tls_cert = Some("cert.pem".into());
    args.tls_key = Some("key.pem".into());
    args.tls_client_ca = Some("ca.pem".into());
    let err = resolve(&args, &[]).unwrap_err().to_string();
    assert!(err.contains("TCP addresses only"), "{err}");
}

#[test]
fn each_setting_is_one_entry_of_the_table() {
    use clap::Args;
    let command = BrokerArgs::augment_args(clap::Command::new("serve"));
    for setting in FILE_SETTINGS {
        assert_eq!(setting.flag.replace('-', "_"), setting.key);
        let arg = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(setting.flag))
            .unwrap_or_else(|| panic!("no flag --{}", setting.flag));
        let help = arg.get_help().unwrap().to_string();
        assert!(help.contains(setting.env[0]), "{help}");
        if let Some(default) = setting.default {
            assert!(help.contains(&format!("[default: {default}]")), "{help}");
        }
    }
}

#[test]
fn event_sources_are_checked_and_exclusive() {
    let queue = "https://sqs.ap-east-1.amazonaws.com/123456789012/secret-events";
    let topic = "arn:aws:sns:ap-east-1:123456789012:secret-events";
    let settings = resolve(
        &BrokerArgs::default(),
        &[("SECRET_EVENTS_QUEUE_URL", queue)],
    )
    .unwrap();
    assert_eq!(settings.events, Some(EventSource::Queue(queue.into())));
    let by_flag = BrokerArgs {
        events_topic_arn: Some(topic.into()),
        ..BrokerArgs::default()
    };
    let settings = resolve(&by_flag, &[]).unwrap();
    assert_eq!(settings.events, Some(EventSource::Topic(topic.into())));
    assert_eq!(resolve(&BrokerArgs::default(), &[]).unwrap().events, None);

    let both = resolve(&by_flag, &[("SECRET_EVENTS_QUEUE_URL", queue)]).unwrap_err();
    assert!(both.to_string().contains("not both"), "{both}");
    let dev = BrokerArgs {
        events_topic_arn: Some(topic.into()),
        ..dev()
    };
    let refused = resolve(&dev, &[]).unwrap_err().to_string();
    assert!(
        refused.contains("--events-topic-arn (SECRET_EVENTS_TOPIC_ARN) needs the AWS backend"),
        "{refused}"
    );
    // Set by the environment alone, it is named as the operator set it.
    let dev_only = BrokerArgs {
        dev: true,
        ..BrokerArgs::default()
    };
    let from_env = resolve(&dev_only, &[("SECRET_EVENTS_QUEUE_URL", queue)]).unwrap_err();
    assert!(
        from_env.to_string().contains("SECRET_EVENTS_QUEUE_URL"),
        "{from_env}"
    );

    let bad_topic = resolve(
        &BrokerArgs::default(),
        &[("SECRET_EVENTS_TOPIC_ARN", "arn:aws:sqs:x")],
    );
    let message = bad_topic.unwrap_err().to_string();
    assert!(
        message.starts_with("SECRET_EVENTS_TOPIC_ARN: "),
        "{message}"
    );
    let bad_queue = resolve(
        &BrokerArgs::default(),
        &[("SECRET_EVENTS_QUEUE_URL", "queue")],
    );
    let message = bad_queue.unwrap_err().to_string();
    assert!(message.contains("not a URL"), "{message}");
}

#[test]
fn durations_take_the_units_of_seconds_to_days_only() {
    let ttl = |value: &str| resolve(&dev(), &[("SECRET_CACHE_TTL", value)]);
    for (value, seconds) in [
        ("300", 300),
        ("5m", 300),
        ("1h 30m", 5400),
        ("2d", 172_800),
        ("90s", 90),
    ] {
        assert_eq!(
            ttl(value).unwrap().cache.ttl,
            Duration::from_secs(seconds),
            "{value}"
        );
    }
    // `M` is months to humantime, `w` weeks, `y` years.
    for value in ["5M", "1w", "1y", "2 months", "5 mins ago", "5µs", "5ns"] {
        let err = ttl(value).unwrap_err().to_string();
        assert!(
            err.contains("is not one of ms, s, m (minutes), h and d"),
            "{value}: {err}"
        );
    }
    // No number: the value is not a duration, whatever its unit.
    let err = ttl("abc").unwrap_err().to_string();
    assert!(
        err.contains("\"abc\" is not a duration: give seconds (e.g. 300) or e.g. 5m"),
        "{err}"
    );
}

#[test]
fn the_keepalive_interval_is_at_least_a_second() {
    let keepalive = |value: &str| resolve(&dev(), &[("BROKER_KEEPALIVE_INTERVAL", value)]);
    let err = keepalive("1ms").unwrap_err().to_string();
    assert!(err.contains("at least 1 second"), "{err}");
    assert_eq!(
        keepalive("1s").unwrap().limits.keepalive_interval,
        Duration::from_secs(1)
    );
}

/// What `serve` would only find at bind time, said by every command (so
/// `check` too): two listeners on one port, a socket path the kernel
/// cannot bind.
#[test]
fn listeners_the_kernel_would_refuse_are_refused_at_once() {
    for (grpc, probes) in [
        ("127.0.0.1:9090", "127.0.0.1:9090"),
        ("127.0.0.1:9090", "[::]:9090"),
        ("127.0.0.1:9090", "[::ffff:127.0.0.1]:9090"),
        ("127.0.0.1:9090", "0.0.0.0:9090"),
    ] {
        let env = [("BROKER_LISTEN", grpc), ("BROKER_METRICS_LISTEN", probes)];
        let error = resolve(&dev(), &env).err().map(|e| e.to_string());
        assert!(
            error
                .as_deref()
                .is_some_and(|e| e.contains("take the same port")),
            "{grpc} and {probes}: {error:?}"
        );
    }
    let apart = [
        ("BROKER_LISTEN", "127.0.0.1:9090"),
        ("BROKER_METRICS_LISTEN", "127.0.0.2:9090"),
    ];
    assert!(resolve(&dev(), &apart).is_ok());
    let any_port = [
        ("BROKER_LISTEN", "127.0.0.1:0"),
        ("BROKER_METRICS_LISTEN", "127.0.0.1:0"),
    ];
    assert!(resolve(&dev(), &any_port).is_ok(), "port 0: each its own");
    let long = format!("unix:/tmp/{}", "s".repeat(120));
    let error = resolve(&dev(), &[("BROKER_LISTEN", long.as_str())])
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(error.contains("the kernel takes at most 107"), "{error}");
}

#[test]
fn a_refused_value_is_quoted_as_given_not_as_trimmed() {
    for (variable, given) in [("SECRET_PREFIX", "/"), ("AWS_DEFAULT_REGION", " ")] {
        let error = resolve(&BrokerArgs::default(), &[(variable, given)])
            .unwrap_err()
            .to_string();
        assert!(error.contains(variable), "{error}");
        assert!(error.contains(&format!("{given:?}")), "{error}");
    }
}

#[test]
fn the_log_filter_and_host_name_come_from_the_environment() {
    let settings = resolve(&BrokerArgs::default(), &[("RUST_LOG", " ")]).unwrap();
    assert_eq!(
        (settings.log_filter, settings.host_name.as_str()),
        (None, "")
    );
    let env = [("RUST_LOG", "h2=debug"), ("HOSTNAME", "broker-7f9c")];
    let settings = resolve(&BrokerArgs::default(), &env).unwrap();
    assert_eq!(settings.log_filter.as_deref(), Some("h2=debug"));
    assert_eq!(settings.host_name, "broker-7f9c");
}

#[test]
fn an_ipv4_mapped_loopback_address_is_loopback() {
    let args = BrokerArgs {
        listen: Some("[::ffff:127.0.0.1]:50051".into()),
        ..BrokerArgs::default()
    };
    assert!(resolve(&args, &[]).is_ok());
    let args = BrokerArgs {
        listen: Some("[::ffff:10.0.0.1]:50051".into()),
        ..BrokerArgs::default()
    };
    assert!(resolve(&args, &[]).is_err());
}

#[test]
fn a_prefix_that_leaves_no_room_for_names_is_refused() {
    let long = "p".repeat(490);
    let error = resolve(&BrokerArgs::default(), &[("SECRET_PREFIX", long.as_str())])
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("--secret-prefix (SECRET_PREFIX) is 490 characters")
            && error.contains("would be 514 characters long")
            && !error.contains("ppp"),
        "{error}"
    );
    let fits = "p".repeat(512 - "/production/aws-services".len());
    assert!(resolve(&BrokerArgs::default(), &[("SECRET_PREFIX", fits.as_str())]).is_ok());
}
