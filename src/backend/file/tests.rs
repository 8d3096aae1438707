//! The file backend: parsing, versions and stages, deletions, reloads, the dev seed.

use super::*;

fn resolver() -> NameResolver {
    NameResolver::new("insurecove", "production")
}

fn store(json: &str) -> FileStore {
    FileStore::from_text("test", json, Format::Json, &resolver()).unwrap()
}

#[tokio::test]
async fn dev_seed_holds_the_five_typical_secrets() {
    let store = FileStore::dev(&resolver()).unwrap();
    for name in [
        "mistral-api-key",
        "production/database",
        "production/jwt",
        "production/aws-services",
        "production/security",
    ] {
        let full = format!("insurecove/{name}");
        let version = store
            .get_secret_value(&full, &VersionSelector::current())
            .await
            .unwrap();
        assert_eq!(version.name, full);
        assert_eq!(version.version_stages, ["AWSCURRENT"]);
        assert!(!version.value.is_empty());
        // A restart (a new store) is not a rotation: the same version id.
        let again = FileStore::dev(&resolver())
            .unwrap()
            .get_secret_value(&full, &VersionSelector::current())
            .await
            .unwrap();
        assert_eq!(again.version_id, version.version_id, "{name}");
    }
    assert_eq!(store.secret_count(), 5);
}

#[tokio::test]
async fn dev_seed_names_its_typed_configs_under_the_environment() {
    let resolver = NameResolver::new("acme", "staging");
    let store = FileStore::dev(&resolver).unwrap();
    for kind in ["database", "jwt", "aws-services", "security"] {
        let default_name = resolver.resolve_or_default("", kind).unwrap();
        assert_eq!(default_name, format!("acme/staging/{kind}"));
        let version = store
            .get_secret_value(&default_name, &VersionSelector::current())
            .await
            .unwrap();
        assert!(!version.value.is_empty(), "{kind}");
        let elsewhere = store
            .get_secret_value(
                &format!("acme/production/{kind}"),
                &VersionSelector::current(),
            )
            .await;
        assert!(elsewhere.is_err(), "{kind} also under production");
    }
    assert_eq!(store.secret_count(), 5);
}

#[tokio::test]
async fn versions_get_aws_like_default_stages() {
    let store = store(
        r#"{"secrets":[{"name":"x","versions":[
                {"value":"old","version_id":"v1"},{"value":"new","version_id":"v2"}]}]}"#,
    );
    let get = |selector| {
        let store = &store;
        async move {
            store
                .get_secret_value("insurecove/x", &selector)
                .await
                .unwrap()
        }
    };
    assert_eq!(get(VersionSelector::current()).await.version_id, "v2");
    let previous = get(VersionSelector::Stage("AWSPREVIOUS".into())).await;
    assert_eq!(previous.value.as_text(), Some("old"));
    let by_id = get(VersionSelector::Id {
        id: "v1".into(),
        stage: None,
    })
    .await;
    assert_eq!(by_id.version_stages, ["AWSPREVIOUS"]);
}

#[tokio::test]
async fn binary_values_and_missing_and_deleted_secrets() {
    let store = store(
        r#"{"secrets":[{"name":"bin","versions":[{"binary_base64":"AAEC/w=="}]},
                           {"name":"gone","deleted":true,"versions":[{"value":"v"}]}]}"#,
    );
    let bin = store
        .get_secret_value("insurecove/bin", &VersionSelector::current())
        .await
        .unwrap();
    assert_eq!(bin.value, SecretValue::binary(vec![0, 1, 2, 255]));
    let current = VersionSelector::current();
    assert!(matches!(
        store.get_secret_value("insurecove/none", &current).await,
        Err(StoreError::NotFound { .. })
    ));
    assert!(matches!(
        store.get_secret_value("insurecove/gone", &current).await,
        Err(StoreError::Deleted { .. })
    ));
    assert!(
        store
            .describe_secret("insurecove/gone")
            .await
            .unwrap()
            .deleted
    );
}

#[tokio::test]
async fn reloads_keep_unchanged_versions_and_refuse_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.json");
    let write = |text: &str| std::fs::write(&path, text).unwrap();
    write(r#"{"secrets":[{"name":"a","versions":[{"value":"one"}]}]}"#);
    let store = FileStore::open(&path, &resolver()).unwrap();
    let signal = store.change_signal().unwrap();
    let now = VersionSelector::current();
    let current = || store.get_secret_value("insurecove/a", &now);
    let first = current().await.unwrap();

    write(r#"{"secrets":[{"name":"a","versions":[{"value":"one"}]}]} "#);
    assert!(!store.reload().unwrap(), "same content: no change");
    assert!(!signal.has_changed().unwrap());

    write(r#"{"secrets":[{"name":"a","versions":[{"value":"one"},{"value":"two"}]}]}"#);
    assert!(store.reload().unwrap());
    assert!(signal.has_changed().unwrap());
    let rotated = current().await.unwrap();
    assert_eq!(rotated.value.as_text(), Some("two"));
    let previous = store
        .get_secret_value(
            "insurecove/a",
            &VersionSelector::Stage("AWSPREVIOUS".into()),
        )
        .await
        .unwrap();
    assert_eq!(
        previous.version_id, first.version_id,
        "an unchanged value keeps its id"
    );

    write(r#"{"secrets":[{"name":"a","versions":[{"value":"thr"#);
    assert!(store.reload().is_err());
    assert_eq!(
        current().await.unwrap(),
        rotated,
        "a broken file keeps the old content"
    );
}

#[tokio::test]
async fn a_value_rolled_back_to_is_a_new_version_and_a_changed_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("secrets.json");
    let write = |text: &str| std::fs::write(&path, text).unwrap();
    write(r#"{"secrets":[{"name":"a","versions":[{"value":"old"},{"value":"new"}]}]}"#);
    let store = FileStore::open(&path, &resolver()).unwrap();
    let now = VersionSelector::current();
    let current = || store.get_secret_value("insurecove/a", &now);
    let before = current().await.unwrap();

    // Rolled back to the first value, as a third version: its own id.
    write(
        r#"{"secrets":[{"name":"a","versions":[{"value":"old"},{"value":"new"},{"value":"old"}]}]}"#,
    );
    assert!(store.reload().unwrap());
    let rolled_back = current().await.unwrap();
    assert_eq!(rolled_back.value.as_text(), Some("old"));
    assert_ne!(rolled_back.version_id, before.version_id);

    // A value changed under an explicit id would never reach a cache that
    // holds that version: refused, naming the version, and kept as it was.
    write(r#"{"secrets":[{"name":"b","versions":[{"value":"hunter2-one","version_id":"v2"}]}]}"#);
    assert!(store.reload().unwrap());
    write(
        r#"{"secrets":[{"name":"b","versions":[{"value":"hunter2-edited","version_id":"v2"}]}]}"#,
    );
    let refused = store.reload().unwrap_err().to_string();
    assert!(
        refused.contains(r#"the value of version "v2" changed"#),
        "{refused}"
    );
    assert!(!refused.contains("hunter2"), "{refused}");
    let kept = store.get_secret_value("insurecove/b", &now).await.unwrap();
    assert_eq!(kept.value.as_text(), Some("hunter2-one"));
}

#[test]
fn toml_files_work_too() {
    let text = r#"
            [[secrets]]
            name = "t"
            [[secrets.versions]]
            value = "from-toml"
            stages = ["AWSCURRENT"]
        "#;
    let store = FileStore::from_text("t.toml", text, Format::Toml, &resolver()).unwrap();
    assert_eq!(store.secret_count(), 1);
}

#[test]
fn parse_errors_never_quote_the_file() {
    let leaky = r#"{"secrets":[{"name":"x","versions":[{"value":123456789}]}]}"#;
    let err = FileStore::from_text("f", leaky, Format::Json, &resolver())
        .err()
        .unwrap()
        .to_string();
    assert!(!err.contains("123456789"), "{err}");
    assert!(err.contains("line 1"), "{err}");

    let toml_leak = "[[secrets]]\nname = \"x\"\nversions = \"hunter2\"\n";
    let err = FileStore::from_text("f", toml_leak, Format::Toml, &resolver())
        .err()
        .unwrap()
        .to_string();
    assert!(!err.contains("hunter2"), "{err}");
}

#[test]
fn invalid_files_are_refused_with_the_reason() {
    let cases = [
        (
            r#"{"secrets":[{"name":"a b","versions":[{"value":"v"}]}]}"#,
            "contains ' '",
        ),
        (
            r#"{"secrets":[{"name":"x","versions":[]}]}"#,
            "has no versions",
        ),
        (
            r#"{"secrets":[{"name":"x","versions":[{"value":"v","binary_base64":"AA=="}]}]}"#,
            "exactly one of",
        ),
        (
            r#"{"secrets":[{"name":"x","versions":[{"value":"a"}]},{"name":"x","versions":[{"value":"b"}]}]}"#,
            "listed twice",
        ),
        (
            r#"{"secrets":[{"name":"x","versions":[{"value":"a","stages":["AWSCURRENT"]},{"value":"b","stages":["AWSCURRENT"]}]}]}"#,
            "more than one version",
        ),
    ];
    let of_size = |len: usize| {
        format!(
            r#"{{"secrets":[{{"name":"x","versions":[{{"value":"{}"}}]}}]}}"#,
            "v".repeat(len)
        )
    };
    assert!(FileStore::from_text("f", &of_size(65_536), Format::Json, &resolver()).is_ok());
    let too_large = of_size(65_537);
    let cases = cases.into_iter().chain([(
        too_large.as_str(),
        "65537 bytes, over Secrets Manager's limit of 65536",
    )]);
    for (text, expected) in cases {
        let err = FileStore::from_text("f", text, Format::Json, &resolver())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(expected), "{err} should contain {expected}");
    }
}
