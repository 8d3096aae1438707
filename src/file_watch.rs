//! Following files on disk: the secrets file, the TLS files and the policy
//! all take effect without a restart when they change.
//!
//! The folder of each file is watched, not the file: editors and secret
//! mounts replace files rather than write them in place. Kubernetes
//! Secret and ConfigMap volumes swap a `..data` symlink, so no event names
//! the file itself: events on `..data*` count too. A file that is a symlink
//! into another folder (certbot's `live/` links into `archive/`) is
//! followed along its links: each folder on the way is watched, and a link
//! repointed or a target written counts. A folder on the path that is a
//! symlink (a deploy's `current -> releases/v2`), and the file's own
//! folder, are watched from the folder above them, so that switching or
//! replacing them counts too.
//!
//! What is watched is worked out again after every change: a watch holds
//! the folder it was given (its inode), not its path, so after a switch the
//! new folder, or a link's new target, would otherwise go unwatched. A
//! change comes as a burst of events (truncate, write, close), so the
//! callback runs once the files have been quiet for a moment, on a thread
//! of its own; it stops when the returned `FileWatch` is dropped.

use std::{
    collections::HashSet,
    ffi::OsString,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use notify::Watcher;

/// The name Kubernetes' atomic writer swaps to publish a volume's files.
const KUBERNETES_SWAP: &str = "..data";

/// How long files must be left alone before the callback runs.
const QUIET: Duration = Duration::from_millis(100);

/// Keeps a watch alive; dropping it ends the watch and its thread.
pub struct FileWatch {
    _shared: Arc<Shared>,
}

/// The files followed, and the watcher of their folders as they stand.
/// The thread holds it weakly: dropping the `FileWatch` drops the watcher
/// and the sender, which ends the thread.
struct Shared {
    paths: Vec<PathBuf>,
    touched: mpsc::Sender<()>,
    watcher: Mutex<Option<notify::RecommendedWatcher>>,
}

/// Calls `on_change` after each burst of changes to any of `paths`. An
/// error: a file's own folder cannot be watched.
pub fn on_change(
    paths: &[&Path],
    on_change: impl Fn() + Send + 'static,
) -> notify::Result<FileWatch> {
    let (touched, touches) = mpsc::channel::<()>();
    let shared = Arc::new(Shared {
        paths: paths.iter().map(|path| path.to_path_buf()).collect(),
        touched,
        watcher: Mutex::new(None),
    });
    shared.watch()?;
    let weak = Arc::downgrade(&shared);
    std::thread::Builder::new()
        .name("file-watch".into())
        .spawn(move || {
            // Ends when the watcher, and with it the sender, is dropped.
            let mut failing = false;
            while touches.recv().is_ok() {
                while touches.recv_timeout(QUIET).is_ok() {}
                let Some(shared) = weak.upgrade() else { break };
                // Kept as it was when a folder is missing for a moment (a
                // swap under way): its next event comes here again. Said
                // once while it lasts: the files may no longer be followed.
                match shared.watch() {
                    Ok(()) => failing = false,
                    Err(error) if !failing => {
                        failing = true;
                        tracing::warn!(%error, files = ?shared.paths, "the files' folders cannot be watched anew: their changes may go unseen until SIGHUP");
                    }
                    Err(_) => {}
                }
                drop(shared);
                on_change();
            }
        })
        .map_err(notify::Error::io)?;
    Ok(FileWatch { _shared: shared })
}

impl Shared {
    /// Watches the folders the files are found through now, in place of
    /// the watch before (made first, so that no change falls between).
    fn watch(&self) -> notify::Result<()> {
        let plan = WatchPlan::of(&self.paths);
        let names = plan.names;
        let touched = self.touched.clone();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Events lost (the queue overflowed: a busy folder above
                // the files is watched too) or a failing watch may hide a
                // change of ours: they count as one.
                let ours = event.as_ref().map_or(true, |event| {
                    event.need_rescan()
                        || !event.kind.is_access()
                            && event.paths.iter().any(|p| {
                                p.file_name().is_some_and(|name| {
                                    names.contains(name)
                                        || name.to_string_lossy().starts_with(KUBERNETES_SWAP)
                                })
                            })
                });
                if ours {
                    let _ = touched.send(());
                }
            })?;
        for folder in &plan.folders {
            watcher.watch(folder, notify::RecursiveMode::NonRecursive)?;
        }
        // One that cannot be watched (gone, or not readable) leaves SIGHUP
        // for that part.
        for folder in plan.around.difference(&plan.folders) {
            if let Err(error) = watcher.watch(folder, notify::RecursiveMode::NonRecursive) {
                tracing::debug!(%error, folder = %folder.display(), "a folder on a file's way cannot be watched");
            }
        }
        *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(watcher);
        Ok(())
    }
}

/// What to watch for a set of files.
struct WatchPlan {
    /// The files' own folders.
    folders: HashSet<PathBuf>,
    /// The folders of the links on their way, and those holding a folder
    /// on their way that may be switched or replaced.
    around: HashSet<PathBuf>,
    /// The names whose events count: the files, the links, those folders.
    names: HashSet<OsString>,
}

impl WatchPlan {
    fn of(paths: &[PathBuf]) -> Self {
        let mut plan = Self {
            folders: paths.iter().map(|path| folder_of(path)).collect(),
            around: HashSet::new(),
            names: HashSet::new(),
        };
        for path in paths {
            // The file's own folder, replaced or renamed whole.
            plan.note_switchable(&folder_of(path));
            for link in link_chain(path) {
                plan.around.insert(folder_of(&link));
                if let Some(name) = link.file_name() {
                    plan.names.insert(name.to_owned());
                }
                for folder in folder_of(&link).ancestors() {
                    if is_symlink(folder) {
                        plan.note_switchable(folder);
                    }
                }
            }
        }
        plan
    }

    /// Watches `folder` from the folder holding it, by its name.
    fn note_switchable(&mut self, folder: &Path) {
        if let (Some(name), Some(_)) = (folder.file_name(), folder.parent()) {
            self.around.insert(folder_of(folder));
            self.names.insert(name.to_owned());
        }
    }
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|meta| meta.file_type().is_symlink())
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
        let (count, _watch) = counting(&root.path().join("etc/tls.crt"));

        // A renewal: a new file in archive/, the live/ link repointed.
        std::fs::write(root.path().join("archive/cert2.pem"), "two").unwrap();
        repoint(&root.path().join("live/cert.pem"), "../archive/cert2.pem");
        assert!(changed_since(&count, 0), "the repointed link went unseen");

        // The new target written in place: followed since the repointing.
        let seen = count.load(SeqCst);
        std::fs::write(root.path().join("archive/cert2.pem"), "two again").unwrap();
        assert!(
            changed_since(&count, seen),
            "the new target's change went unseen"
        );
    }

    #[test]
    fn a_link_repointed_into_another_folder_is_followed_there() {
        let root = tempfile::tempdir().unwrap();
        for folder in ["etc", "a", "b"] {
            std::fs::create_dir(root.path().join(folder)).unwrap();
        }
        std::fs::write(root.path().join("a/policy.toml"), "a").unwrap();
        std::fs::write(root.path().join("b/policy.toml"), "b").unwrap();
        symlink("../a/policy.toml", root.path().join("etc/policy.toml")).unwrap();
        let (count, _watch) = counting(&root.path().join("etc/policy.toml"));
        repoint(&root.path().join("etc/policy.toml"), "../b/policy.toml");
        assert!(changed_since(&count, 0), "the repointed link went unseen");
        let seen = count.load(SeqCst);
        std::fs::write(root.path().join("b/policy.toml"), "b again").unwrap();
        assert!(changed_since(&count, seen), "b/ is not followed");
    }

    #[test]
    fn a_folder_on_the_way_switched_or_replaced_is_followed() {
        // A deploy's layout: current -> releases/v1, switched to v2.
        let root = tempfile::tempdir().unwrap();
        for release in ["v1", "v2", "v3"] {
            let folder = root.path().join("releases").join(release);
            std::fs::create_dir_all(&folder).unwrap();
            std::fs::write(folder.join("ca.pem"), release).unwrap();
        }
        symlink("releases/v1", root.path().join("current")).unwrap();
        let (count, _watch) = counting(&root.path().join("current/ca.pem"));
        repoint(&root.path().join("current"), "releases/v2");
        assert!(changed_since(&count, 0), "the switch went unseen");
        let seen = count.load(SeqCst);
        std::fs::write(root.path().join("releases/v2/ca.pem"), "v2 again").unwrap();
        assert!(changed_since(&count, seen), "v2 is not followed");

        // A file's own folder renamed into place.
        let (count, _watch) = counting(&root.path().join("releases/v1/ca.pem"));
        std::fs::rename(
            root.path().join("releases/v1"),
            root.path().join("releases/old"),
        )
        .unwrap();
        std::fs::rename(
            root.path().join("releases/v3"),
            root.path().join("releases/v1"),
        )
        .unwrap();
        assert!(
            changed_since(&count, 0),
            "the folder's replacement went unseen"
        );
        let seen = count.load(SeqCst);
        std::fs::write(root.path().join("releases/v1/ca.pem"), "v3 again").unwrap();
        assert!(
            changed_since(&count, seen),
            "the new folder is not followed"
        );
    }

    /// Points the link at `link` to `target` in one step, as deploy tools
    /// and certbot do: a new link renamed over the old one.
    fn repoint(link: &Path, target: &str) {
        let new = link.with_extension("new");
        symlink(target, &new).unwrap();
        std::fs::rename(new, link).unwrap();
    }

    /// A watch of `path` that counts its changes.
    fn counting(path: &Path) -> (Arc<AtomicUsize>, FileWatch) {
        let count = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&count);
        let watch = on_change(&[path], move || {
            counted.fetch_add(1, SeqCst);
        })
        .unwrap();
        (count, watch)
    }
}
