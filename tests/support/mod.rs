//! Helpers of the Rust integration tests (tests/client.rs): a real
//! `moto_server` (AWS Secrets Manager) and the real broker binary on free
//! loopback ports, seeded and stopped by the test, and a test PKI made
//! with `rcgen` for mutual TLS.
//!
//! Every process is owned by a guard that kills it when dropped, so a
//! failing test leaves nothing running. Logs go to
//! `target/client-test-logs/<test>-<what>.log` (outside `target/test-logs/`,
//! which the pytest suite empties when it starts).
//!
//! The tools: `MOTO_SERVER` (the moto_server executable, set by
//! ./scripts/test.sh) is required: without it the tests FAIL with a message
//! saying so, they never skip. The broker is `CARGO_BIN_EXE_secrets-broker`.

use std::{
    fs::File,
    future::Future,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use aws_sdk_secretsmanager::{
    Client as SmClient,
    config::{BehaviorVersion, Credentials, Region},
};
use secrets_broker_client::{ClientConfig, Error, SecretsClient};

/// The region, keys and endpoint variables the broker gets for moto.
pub const REGION: &str = "ap-east-1";
const ACCESS_KEY: &str = "testing";
const SECRET_KEY: &str = "testing";

const MOTO_STARTUP: Duration = Duration::from_secs(30);
const BROKER_STARTUP: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Environment variables a test process must not inherit from the machine
/// (they would change what is tested): the broker's own, the AWS SDK's,
/// and proxies (compared case-insensitively).
const SCRUBBED_PREFIXES: &[&str] = &["BROKER_", "SECRET_", "AWS_"];
const SCRUBBED_PROXY: &[&str] = &["HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY"];

/// The directory of this run's logs.
pub fn log_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-test-logs");
    std::fs::create_dir_all(&dir).expect("create target/client-test-logs");
    dir
}

/// `moto_server` from `MOTO_SERVER`: a clear failure when it is not set.
pub fn moto_server_bin() -> PathBuf {
    let value = std::env::var("MOTO_SERVER").unwrap_or_default();
    if value.is_empty() {
        panic!(
            "environment variable MOTO_SERVER is not set: these tests need a real moto_server. \
             Run them through ./scripts/test.sh (it installs moto into .tools/venv and exports \
             MOTO_SERVER), or set MOTO_SERVER=$PWD/.tools/venv/bin/moto_server"
        );
    }
    let path = PathBuf::from(&value);
    assert!(
        path.is_file(),
        "MOTO_SERVER={value} is not a file (run ./scripts/test.sh to install the tools)"
    );
    path
}

/// The broker binary Cargo built for these tests.
pub fn broker_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_secrets-broker"))
}

/// A free TCP port on 127.0.0.1 (free when asked; the OS does not hand it
/// out again soon).
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
}

/// A command whose environment holds none of the machine's broker, AWS or
/// proxy settings.
fn scrubbed(program: &Path) -> Command {
    let mut command = Command::new(program);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let upper = key.to_ascii_uppercase();
        if SCRUBBED_PREFIXES.iter().any(|p| key.starts_with(p))
            || SCRUBBED_PROXY.contains(&upper.as_str())
        {
            command.env_remove(key);
        }
    }
    command.stdin(Stdio::null());
    command
}

/// The last lines of a log file, for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(error) => format!("<cannot read {}: {error}>", path.display()),
    }
}

/// A child process killed (and reaped) when dropped.
pub struct ChildGuard {
    child: Option<Child>,
    what: String,
}

impl ChildGuard {
    fn new(child: Child, what: impl Into<String>) -> Self {
        Self {
            child: Some(child),
            what: what.into(),
        }
    }

    /// Its exit status, when it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// SIGKILL, then reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (a name kill(1) knows: STOP, CONT...) to it.
    pub fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let sent = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status()
                .expect("run kill(1)");
            assert!(sent.success(), "kill -{signal} {}: {sent}", self.what);
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL; returns the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        // std has no SIGTERM: kill(1) sends it to this pid only.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => {
                    eprintln!(
                        "{} did not stop within {grace:?} of SIGTERM: killed",
                        self.what
                    );
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

// --------------------------------------------------------------------------
// moto_server

/// A moto_server on 127.0.0.1:port, with an SDK client to seed it.
pub struct Moto {
    /// Kills moto when the test ends.
    process: ChildGuard,
    pub port: u16,
    /// Empty AWS config/credentials files for the broker, and moto's cwd.
    workdir: tempfile::TempDir,
    client: SmClient,
}

impl Moto {
    /// Starts moto_server (path from `MOTO_SERVER`) on a free port and waits
    /// until it answers HTTP.
    pub fn start(test: &str) -> Self {
        let binary = moto_server_bin();
        let port = free_port();
        let log = log_dir().join(format!("{test}-moto.log"));
        let workdir = tempfile::tempdir().expect("temp dir for moto");
        let mut log_file = File::create(&log).expect("create moto log");
        let _ = writeln!(log_file, "$ {} -H 127.0.0.1 -p {port}", binary.display());
        let child = scrubbed(&binary)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .env("PYTHONUNBUFFERED", "1")
            .current_dir(workdir.path())
            .stdout(log_file.try_clone().expect("dup moto log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto_server {}: {e}", binary.display()));
        let mut process = ChildGuard::new(child, "moto_server");
        let deadline = Instant::now() + MOTO_STARTUP;
        let mut last;
        loop {
            if let Some(status) = process.exited() {
                panic!(
                    "moto_server exited ({status}) before answering on port {port}; log {}:\n{}",
                    log.display(),
                    log_tail(&log, 30)
                );
            }
            match http_get_status(port, "/moto-api/") {
                Ok(200) => break,
                Ok(code) => last = format!("HTTP {code}"),
                Err(error) => last = error.to_string(),
            }
            if Instant::now() > deadline {
                panic!(
                    "moto_server not answering on 127.0.0.1:{port} after {MOTO_STARTUP:?} ({last}); log {}:\n{}",
                    log.display(),
                    log_tail(&log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let config = aws_sdk_secretsmanager::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .region(Region::new(REGION))
            .credentials_provider(Credentials::new(
                ACCESS_KEY,
                SECRET_KEY,
                None,
                None,
                "client-tests",
            ))
            .build();
        Self {
            process,
            port,
            workdir,
            client: SmClient::from_conf(config),
        }
    }

    /// SIGKILL: AWS is gone (connections refused) until the test ends.
    pub fn stop(&mut self) {
        self.process.kill();
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The environment that points a broker's AWS backend at this moto
    /// (nothing from the machine's ~/.aws).
    pub fn broker_env(&self) -> Vec<(String, String)> {
        let config = self.workdir.path().join("aws-config-empty");
        let credentials = self.workdir.path().join("aws-credentials-empty");
        for path in [&config, &credentials] {
            File::create(path).expect("empty aws file");
        }
        vec![
            ("AWS_ENDPOINT_URL".into(), self.url()),
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_KEY.into()),
            ("AWS_DEFAULT_REGION".into(), REGION.into()),
            ("AWS_CONFIG_FILE".into(), config.display().to_string()),
            (
                "AWS_SHARED_CREDENTIALS_FILE".into(),
                credentials.display().to_string(),
            ),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }

    /// Creates a text secret (full name); returns its version id.
    pub async fn create_secret(&self, name: &str, value: &str) -> String {
        let out = self
            .client
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .unwrap_or_else(|e| panic!("moto CreateSecret {name}: {e:?}"));
        out.version_id()
            .expect("CreateSecret version id")
            .to_owned()
    }

    /// Deletes the secret for good and creates it again under its name with
    /// `value`, giving it the version id `version_id` (as a caller's
    /// ClientRequestToken does): another secret, under a new ARN.
    pub async fn create_again(&self, name: &str, value: &str, version_id: &str) {
        self.client
            .delete_secret()
            .secret_id(name)
            .force_delete_without_recovery(true)
            .send()
            .await
            .unwrap_or_else(|e| panic!("moto DeleteSecret {name}: {e:?}"));
        self.client
            .create_secret()
            .name(name)
            .secret_string(value)
            .client_request_token(version_id)
            .send()
            .await
            .unwrap_or_else(|e| panic!("moto CreateSecret {name} again: {e:?}"));
    }

    /// A new AWSCURRENT version (the old one becomes AWSPREVIOUS); its id.
    pub async fn put_secret_value(&self, name: &str, value: &str) -> String {
        let out = self
            .client
            .put_secret_value()
            .secret_id(name)
            .secret_string(value)
            .send()
            .await
            .unwrap_or_else(|e| panic!("moto PutSecretValue {name}: {e:?}"));
        out.version_id()
            .expect("PutSecretValue version id")
            .to_owned()
    }
}

/// A bare HTTP/1.0 GET on 127.0.0.1:port (no proxy involved): the status.
fn http_get_status(port: u16, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(
        &SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Duration::from_secs(1),
    )?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    let text = String::from_utf8_lossy(&head);
    text.get(9..12)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))
}

// --------------------------------------------------------------------------
// the broker

/// How a test broker is started; `Broker::start` runs it.
#[derive(Clone)]
pub struct BrokerSpec {
    pub test: String,
    pub port: u16,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl BrokerSpec {
    /// `serve --listen 127.0.0.1:<free port>` on the AWS backend (moto),
    /// LOG_LEVEL=debug.
    pub fn aws(test: &str, moto: &Moto) -> Self {
        let mut env = moto.broker_env();
        env.push(("LOG_LEVEL".into(), "debug".into()));
        Self {
            test: test.into(),
            port: free_port(),
            args: Vec::new(),
            env,
        }
    }

    pub fn args<I: IntoIterator<Item = S>, S: Into<String>>(mut self, args: I) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// A running broker (its process is killed when this is dropped).
pub struct Broker {
    pub spec: BrokerSpec,
    process: ChildGuard,
    pub log: PathBuf,
    workdir: tempfile::TempDir,
    starts: u32,
}

impl Broker {
    /// Starts the broker binary; does not wait (see `wait_ready`).
    pub fn spawn(spec: BrokerSpec) -> Self {
        let workdir = tempfile::tempdir().expect("temp dir for the broker");
        let log = log_dir().join(format!("{}-broker.log", spec.test));
        let process = Self::launch(&spec, &log, workdir.path(), 1);
        Self {
            spec,
            process,
            log,
            workdir,
            starts: 1,
        }
    }

    fn launch(spec: &BrokerSpec, log: &Path, cwd: &Path, start: u32) -> ChildGuard {
        let binary = broker_bin();
        // The first start empties the log; restarts append to it.
        let mut log_file = if start == 1 {
            File::create(log)
        } else {
            std::fs::OpenOptions::new().append(true).open(log)
        }
        .expect("open broker log");
        let env_text: String = spec.env.iter().map(|(k, v)| format!("{k}={v} ")).collect();
        let _ = writeln!(
            log_file,
            "\n=== start #{start}\n$ {env_text}{} serve --listen {} {}",
            binary.display(),
            spec.addr(),
            spec.args.join(" ")
        );
        let child = scrubbed(&binary)
            .arg("serve")
            .args(["--listen", &spec.addr()])
            .args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .current_dir(cwd)
            .stdout(log_file.try_clone().expect("dup broker log"))
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        ChildGuard::new(child, "secrets-broker")
    }

    /// Waits until `probe` (a call through the client crate) answers with
    /// something other than a transport/unavailable error. Fails with the
    /// broker's log when it exits or does not come up in time.
    pub async fn wait_ready<F, Fut, T>(&mut self, probe: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Error>>,
    {
        let deadline = Instant::now() + BROKER_STARTUP;
        let mut last;
        loop {
            if let Some(status) = self.process.exited() {
                panic!(
                    "the broker exited ({status}) before serving on {}; log {}:\n{}",
                    self.spec.addr(),
                    self.log.display(),
                    log_tail(&self.log, 40)
                );
            }
            if TcpStream::connect_timeout(
                &SocketAddr::from((Ipv4Addr::LOCALHOST, self.spec.port)),
                Duration::from_millis(500),
            )
            .is_ok()
            {
                match probe().await {
                    Ok(_) => return,
                    Err(error) if error.is_retryable() => last = error.to_string(),
                    // Any answer of the broker's own (even a refusal) means it serves.
                    Err(_) => return,
                }
            } else {
                last = "port not accepting connections".into();
            }
            if Instant::now() > deadline {
                panic!(
                    "the broker is not serving on {} after {BROKER_STARTUP:?} ({last}); log {}:\n{}",
                    self.spec.addr(),
                    self.log.display(),
                    log_tail(&self.log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no drain, connections simply drop.
    pub fn kill(&mut self) {
        self.process.kill();
    }

    /// SIGSTOP (`true`): the broker hangs, its connections open but
    /// silent; SIGCONT (`false`) lets it go on.
    pub fn pause(&self, paused: bool) {
        self.process.signal(if paused { "STOP" } else { "CONT" });
    }

    /// SIGTERM (the broker drains), SIGKILL after a grace period.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        self.process.terminate(STOP_GRACE)
    }

    /// Starts the same command again, on the same port (does not wait).
    pub fn restart(&mut self) {
        self.process.kill();
        self.starts += 1;
        self.process = Self::launch(&self.spec, &self.log, self.workdir.path(), self.starts);
    }

    pub fn addr(&self) -> String {
        self.spec.addr()
    }

    pub fn log_tail(&self) -> String {
        log_tail(&self.log, 40)
    }
}

/// A plaintext client of a loopback broker.
pub async fn plaintext_client(broker: &Broker) -> SecretsClient {
    SecretsClient::connect(ClientConfig::new(broker.addr()))
        .await
        .expect("client config")
}

// mutual TLS: a test PKI made with rcgen (also used by the load generator)
mod pki;
pub use pki::Pki;

// --------------------------------------------------------------------------
// small helpers

/// Awaits `future` for at most `limit`; panics naming `what` otherwise.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: nothing within {limit:?}"),
    }
}
