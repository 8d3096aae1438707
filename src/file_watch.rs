//! Following files on disk: the secrets file, the TLS files and the policy
//! all take effect without a restart when they change.
//!
//! The folder of each file is watched, not the file: editors and secret
//! mounts replace files rather than write them in place. Kubernetes
//! Secret and ConfigMap volumes swap a `..data` symlink, so no event names
//! the file itself: events on `..data*` count too. A change comes as a burst of events (truncate, write, close),
//! so the callback runs once the files have been quiet for a moment, on a
//! thread of its own; it stops when the returned `FileWatch` is dropped.

use std::{
    collections::HashSet,
    ffi::OsString,
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use notify::Watcher;

/// The name Kubernetes' atomic writer swaps to publish a volume's files.
const KUBERNETES_SWAP: &str = "..data";

/// How long files must be left alone before the callback runs.
const QUIET: Duration = Duration::from_millis(100);

/// Keeps a watch alive; dropping it ends the watch and its thread.
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
}

/// Calls `on_change` after each burst of changes to any of `paths`.
pub fn on_change(
    paths: &[&Path],
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<FileWatch> {
    let names: HashSet<OsString> = paths
        .iter()
        .filter_map(|path| path.file_name().map(|name| name.to_owned()))
        .collect();
    let (touched, touches) = mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let ours = event.is_ok_and(|event| {
            !event.kind.is_access()
                && event.paths.iter().any(|p| {
                    p.file_name().is_some_and(|name| {
                        names.contains(name) || name.to_string_lossy().starts_with(KUBERNETES_SWAP)
                    })
                })
        });
        if ours {
            let _ = touched.send(());
        }
    })?;
    let folders: HashSet<PathBuf> = paths.iter().map(|path| folder_of(path)).collect();
    for folder in &folders {
        watcher.watch(folder, notify::RecursiveMode::NonRecursive)?;
    }
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || {
            // Ends when the watcher, and with it the sender, is dropped.
            while touches.recv().is_ok() {
                while touches.recv_timeout(QUIET).is_ok() {}
                on_change();
            }
        })
        .map_err(notify::Error::io)?;
    Ok(FileWatch { _watcher: watcher })
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}
