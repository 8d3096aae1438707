//! A value read from files that reloads without a restart: the secrets
//! file, the policy and the TLS files are each one `Reloadable`.
//!
//! - Readers get the value in force lock-free (`current`), every call.
//! - A `Loader` reads and validates the files; a broken new file keeps the
//!   old value, and the log says why (one warning per attempt).
//! - The files are followed on disk (`file_watch`), and `follow` reloads
//!   every value on SIGHUP, and a value when it says it is due (the TLS
//!   config when a client CA's dates pass: the files have not changed, but
//!   what they mean has).
//! - `changes` counts replacements, for whoever must react (policy reloads
//!   end revoked watch streams; secrets-file edits wake the change
//!   detector).
//! - Each value registers its metrics: reloads done, reloads refused, and
//!   whether the file on disk is refused now (the old value still in force),
//!   which is what an alert should watch.

use std::{
    fmt::Display,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, SystemTime},
};

use arc_swap::{ArcSwap, Guard};
use tokio::sync::watch;

use crate::{
    file_watch::{self, FileWatch},
    metrics::{Metrics, counter, gauge},
};

/// Reads and validates a reloadable value.
pub trait Loader: Send + Sync + 'static {
    type Value: Send + Sync + 'static;
    type Error: Display;

    /// What the value is, in log lines ("policy", "TLS certificates").
    fn what(&self) -> &'static str;

    /// The files it is read from (none: it never changes).
    fn files(&self) -> Vec<PathBuf>;

    /// Reads the files; `previous` is the value in force, if any.
    fn load(&self, previous: Option<&Self::Value>) -> Result<Self::Value, Self::Error>;

    /// Whether a reload found nothing new (then nobody is told).
    fn same(&self, _old: &Self::Value, _new: &Self::Value) -> bool {
        false
    }

    /// Called once a reload has put a new value in force in place of
    /// `replaced`.
    fn replaced(&self, _replaced: &Self::Value) {}

    /// When `value` must be read again although its files have not
    /// changed, if ever.
    fn reload_due(&self, _value: &Self::Value) -> Option<SystemTime> {
        None
    }
}

/// A value that follows its files; share it in an `Arc`.
pub struct Reloadable<L: Loader> {
    loader: L,
    current: ArcSwap<L::Value>,
    changes: watch::Sender<u64>,
    watch: Mutex<Option<FileWatch>>,
    reloaded: AtomicU64,
    refused: AtomicU64,
    /// The last reload was refused: the files on disk are not in force.
    failing: AtomicBool,
}

impl<L: Loader> Reloadable<L> {
    /// Loads the value once; an error here stops the start.
    pub fn new(loader: L) -> Result<Arc<Self>, L::Error> {
        let value = loader.load(None)?;
        Ok(Arc::new(Self {
            loader,
            current: ArcSwap::from_pointee(value),
            changes: watch::Sender::new(0),
            watch: Mutex::new(None),
            reloaded: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            failing: AtomicBool::new(false),
        }))
    }

    /// The value in force.
    pub fn current(&self) -> Guard<Arc<L::Value>> {
        self.current.load()
    }

    /// The value in force, to keep.
    pub fn snapshot(&self) -> Arc<L::Value> {
        self.current.load_full()
    }

    /// The loader, for what it knows of its files.
    pub fn loader(&self) -> &L {
        &self.loader
    }

    /// Reads the files again; returns whether the value changed. On error
    /// the value in force stays.
    pub fn reload(&self) -> Result<bool, L::Error> {
        let previous = self.current.load_full();
        let value = match self.loader.load(Some(&previous)) {
            Ok(value) => value,
            Err(error) => {
                self.refused.fetch_add(1, Relaxed);
                self.failing.store(true, Relaxed);
                return Err(error);
            }
        };
        self.failing.store(false, Relaxed);
        if self.loader.same(&previous, &value) {
            return Ok(false);
        }
        // Swapped, not stored: two reloads can overlap (a SIGHUP and the
        // file watch), and the value each one replaces is the one it
        // swapped out, so that every replaced value is told once.
        let replaced = self.current.swap(Arc::new(value));
        self.loader.replaced(&replaced);
        self.changes.send_modify(|count| *count += 1);
        self.reloaded.fetch_add(1, Relaxed);
        Ok(true)
    }

    /// `reload`, with a log line saying what happened.
    pub fn reload_and_log(&self) {
        let what = self.loader.what();
        match self.reload() {
            Ok(true) => tracing::info!("{what} reloaded"),
            Ok(false) => {}
            Err(error) => tracing::warn!(%error, "{what} not reloaded; keeping the previous one"),
        }
    }

    /// Follows the files on disk until `self` is dropped.
    pub fn follow_files(self: &Arc<Self>) -> notify::Result<()> {
        let files = self.loader.files();
        if files.is_empty() {
            return Ok(());
        }
        let paths: Vec<&std::path::Path> = files.iter().map(PathBuf::as_path).collect();
        let weak = Arc::downgrade(self);
        let watch = file_watch::on_change(&paths, move || {
            if let Some(reloadable) = weak.upgrade() {
                reloadable.reload_and_log();
            }
        })?;
        *self.watch.lock().unwrap_or_else(|e| e.into_inner()) = Some(watch);
        Ok(())
    }

    /// Changes each time the value is replaced.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Anything reloaded on SIGHUP.
pub trait Reload: Send + Sync {
    fn reload_and_log(&self);
    fn follow_files(self: Arc<Self>) -> notify::Result<()>;
    /// When the value in force must be read again (see `Loader::reload_due`).
    fn reload_due(&self) -> Option<SystemTime>;
    /// Changes each time the value is replaced.
    fn changes(&self) -> watch::Receiver<u64>;
    /// Registers `<what>_reloads`, `<what>_reloads_refused` and
    /// `<what>_reload_failing` (`what` as a metric name: `policy`,
    /// `tls_certificates`, `secrets_file`).
    fn register_metrics(self: Arc<Self>, metrics: &Metrics);
}

impl<L: Loader> Reload for Reloadable<L> {
    fn reload_and_log(&self) {
        Reloadable::reload_and_log(self);
    }

    fn follow_files(self: Arc<Self>) -> notify::Result<()> {
        Reloadable::follow_files(&self)
    }

    fn reload_due(&self) -> Option<SystemTime> {
        self.loader.reload_due(&self.current())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        Reloadable::changes(self)
    }

    fn register_metrics(self: Arc<Self>, metrics: &Metrics) {
        let what = self.loader.what();
        let name = what.to_lowercase().replace(' ', "_");
        let names = [
            format!("{name}_reloads"),
            format!("{name}_reloads_refused"),
            format!("{name}_reload_failing"),
        ];
        let helps = [
            format!("Reloads of the {what} that put new files in force"),
            format!("Reloads of the {what} refused (the files in force stay)"),
            format!("1 while the {what} on disk is refused and older files are in force"),
        ];
        metrics.register_state(move |e| {
            counter(e, &names[0], &helps[0], self.reloaded.load(Relaxed))?;
            counter(e, &names[1], &helps[1], self.refused.load(Relaxed))?;
            gauge(
                e,
                &names[2],
                &helps[2],
                i64::from(self.failing.load(Relaxed)),
            )
        });
    }
}

/// The longest wait between two looks at when values are due; a reload
/// refused when it was due is tried again this often.
const DUE_LOOK: Duration = Duration::from_secs(60);

/// Follows every value's files, reloads them all on each SIGHUP, and each
/// one when it is due, until `stop`.
pub async fn follow(values: Vec<Arc<dyn Reload>>, stop: tokio_util::sync::CancellationToken) {
    for value in &values {
        if let Err(error) = Arc::clone(value).follow_files() {
            tracing::warn!(%error, "cannot follow a file; it reloads on SIGHUP only");
        }
    }
    // Without SIGHUP (it cannot be caught here), values still reload when
    // due and when their files change.
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut changes: Vec<watch::Receiver<u64>> =
        values.iter().map(|value| value.changes()).collect();
    loop {
        // A value replaced (its files edited) may be due at another time:
        // the wait is worked out again then.
        // A value dropped (its sender gone) is not waited for again.
        let mut gone = None;
        let replaced = async {
            if changes.is_empty() {
                return std::future::pending().await;
            }
            let each = changes
                .iter_mut()
                .map(|changes| Box::pin(changes.changed()));
            let (changed, index, _) = futures::future::select_all(each).await;
            changed.is_err().then_some(index)
        };
        tokio::select! {
            () = stop.cancelled() => return,
            dropped = replaced => gone = dropped,
            _ = hangup(&mut hangups) => {
                tracing::info!("SIGHUP: reloading");
                for value in &values {
                    value.reload_and_log();
                }
            }
            () = tokio::time::sleep(until_due(&values, SystemTime::now())) => {
                let now = SystemTime::now();
                for value in values.iter().filter(|value| value.reload_due().is_some_and(|due| due <= now)) {
                    value.reload_and_log();
                }
            }
        }
        if let Some(index) = gone {
            changes.remove(index);
        }
    }
}

/// The next SIGHUP; never, when it cannot be caught.
async fn hangup(hangups: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hangups {
        Some(hangups) => hangups.recv().await,
        None => std::future::pending().await,
    }
}

/// How long until the first value is due: at most `DUE_LOOK`, and
/// `DUE_LOOK` when one is past due already (its reload was refused: it is
/// tried again then, not in a loop).
fn until_due(values: &[Arc<dyn Reload>], now: SystemTime) -> Duration {
    values
        .iter()
        .filter_map(|value| value.reload_due())
        .map(|due| match due.duration_since(now) {
            Ok(wait) => wait.min(DUE_LOOK),
            Err(_) => DUE_LOOK,
        })
        .min()
        .unwrap_or(DUE_LOOK)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

    use super::*;

    /// Loads a number from a file; "bad" is refused.
    struct Number {
        path: PathBuf,
        loads: AtomicU32,
    }

    impl Loader for Number {
        type Value = u32;
        type Error = String;

        fn what(&self) -> &'static str {
            "number"
        }

        fn files(&self) -> Vec<PathBuf> {
            vec![self.path.clone()]
        }

        fn load(&self, _: Option<&u32>) -> Result<u32, String> {
            self.loads.fetch_add(1, SeqCst);
            let text = std::fs::read_to_string(&self.path).map_err(|e| e.to_string())?;
            text.trim()
                .parse()
                .map_err(|_| format!("{text:?} is not a number"))
        }

        fn same(&self, old: &u32, new: &u32) -> bool {
            old == new
        }
    }

    /// A `Number` read from a file holding 1, in `dir`.
    fn number_in(dir: &tempfile::TempDir) -> (PathBuf, Arc<Reloadable<Number>>) {
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let value = Reloadable::new(Number {
            path: path.clone(),
            loads: AtomicU32::new(0),
        })
        .unwrap();
        (path, value)
    }

    #[test]
    fn a_broken_file_keeps_the_value_and_changes_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let (path, value) = number_in(&dir);
        let changes = value.changes();
        std::fs::write(&path, "bad").unwrap();
        assert!(value.reload().is_err());
        assert_eq!(**value.current(), 1, "the old value stays");
        std::fs::write(&path, "1").unwrap();
        assert!(!value.reload().unwrap(), "same value: no change");
        assert!(!changes.has_changed().unwrap());
        std::fs::write(&path, "2").unwrap();
        assert!(value.reload().unwrap());
        assert_eq!(**value.current(), 2);
        assert!(changes.has_changed().unwrap());
    }

    #[test]
    fn reloads_are_counted_and_a_refused_file_shows_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        let (path, value) = number_in(&dir);
        let metrics = Metrics::new();
        (Arc::clone(&value) as Arc<dyn Reload>).register_metrics(&metrics);
        let shows = |line: &str| metrics.encode().lines().any(|l| l == line);

        std::fs::write(&path, "bad").unwrap();
        assert!(value.reload().is_err());
        assert!(shows("secretsbroker_number_reload_failing 1"));
        assert!(shows("secretsbroker_number_reloads_refused_total 1"));
        std::fs::write(&path, "2").unwrap();
        assert!(value.reload().unwrap());
        assert!(shows("secretsbroker_number_reload_failing 0"));
        assert!(shows("secretsbroker_number_reloads_total 1"));
    }
}
