//! Following files on disk: the secrets file, the TLS files and the policy
//! all take effect without a restart when they change.
//!
//! The folder of each file is watched, not the file: editors and secret
//! mounts replace files rather than write them in place. Kubernetes
//! Secret and ConfigMap volumes swap a `..data` symlink, so no event names
//! the file itself: events on `..data*` count too. A file that is a symlink
//! into another folder (certbot's `live/` links into `archive/`) is
//! followed along its links: each folder on the way is watched, and a link
//! repointed or a target written counts. A change comes as a burst of events (truncate, write, close),
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
    let chains: Vec<Vec<PathBuf>> = paths.iter().map(|path| link_chain(path)).collect();
    let names: HashSet<OsString> = chains
        .iter()
        .flatten()
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
    // The folders the links lead to: one that cannot be watched (gone, or
    // not readable) leaves SIGHUP for that part.
    let linked: HashSet<PathBuf> = chains
        .iter()
        .flat_map(|chain| chain.iter().skip(1))
        .map(|path| folder_of(path))
        .filter(|folder| !folders.contains(folder))
        .collect();
    for folder in &linked {
        if let Err(error) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
            tracing::debug!(%error, folder = %folder.display(), "a linked file's folder cannot be watched");
        }
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

/// `path`, then each file its symlinks lead to (eight links at most).
fn link_chain(path: &Path) -> Vec<PathBuf> {
    let mut chain = vec![path.to_owned()];
    for _ in 0..8 {
        let Some(current) = chain.last() else { break };
        let Ok(target) = std::fs::read_link(current) else {
            break;
        };
        let next = if target.is_absolute() {
            target
        } else {
            folder_of(current).join(target)
        };
        chain.push(next);
    }
    chain
}

fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::symlink,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering::SeqCst},
        },
    };

    use super::*;

    /// Waits up to two seconds for `count` to pass `seen`.
    fn changed_since(count: &AtomicUsize, seen: usize) -> bool {
        for _ in 0..40 {
            if count.load(SeqCst) > seen {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    #[test]
    fn a_file_behind_symlinks_into_other_folders_is_followed() {
        // certbot's layout: etc/tls.crt -> live/cert.pem -> archive/cert1.pem
        let root = tempfile::tempdir().unwrap();
        for folder in ["etc", "live", "archive"] {
            std::fs::create_dir(root.path().join(folder)).unwrap();
        }
        std::fs::write(root.path().join("archive/cert1.pem"), "one").unwrap();
        symlink("../archive/cert1.pem", root.path().join("live/cert.pem")).unwrap();
        symlink("../live/cert.pem", root.path().join("etc/tls.crt")).unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        let path = root.path().join("etc/tls.crt");
        let _watch = on_change(&[&path], move || {
            counted.fetch_add(1, SeqCst);
        })
        .unwrap();

        // A renewal: a new file in archive/, the live/ link repointed.
        std::fs::write(root.path().join("archive/cert2.pem"), "two").unwrap();
        symlink("../archive/cert2.pem", root.path().join("live/cert.new")).unwrap();
        std::fs::rename(
            root.path().join("live/cert.new"),
            root.path().join("live/cert.pem"),
        )
        .unwrap();
        assert!(changed_since(&count, 0), "the repointed link went unseen");

        // The target written in place.
        let seen = count.load(SeqCst);
        std::fs::write(root.path().join("archive/cert1.pem"), "one again").unwrap();
        assert!(
            changed_since(&count, seen),
            "the target's change went unseen"
        );
    }
}
