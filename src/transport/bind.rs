//! Binding the sockets the settings name: the gRPC listener (TCP or a
//! unix socket, whose file is made ready for its callers) and the probes
//! port. Apart from building the app, so that a test can bind port 0 and
//! learn the address before the broker is built.

use std::{io, net::SocketAddr, path::Path};

use crate::{
    config::{ListenAddr, Settings},
    transport::listener::Bound,
};

/// A socket that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({setting}): {source}")]
pub struct BindError {
    addr: String,
    /// The setting that names it (its flag and its variable: either may
    /// have set it): which of two listeners failed.
    setting: &'static str,
    source: std::io::Error,
}

/// The bound sockets: gRPC, and the probes/metrics endpoint if asked for.
pub struct Listeners {
    pub(crate) grpc: Bound,
    pub(crate) probes: Option<tokio::net::TcpListener>,
}

impl Listeners {
    /// Binds what the settings name.
    pub async fn bind(settings: &Settings) -> Result<Self, BindError> {
        let listen_error = |addr: String| {
            move |source| BindError {
                addr,
                setting: "--listen / BROKER_LISTEN",
                source,
            }
        };
        let grpc = match &settings.listen {
            ListenAddr::Tcp(addr) => Bound::Tcp(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(listen_error(addr.to_string()))?,
            ),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).map_err(listen_error(settings.listen.to_string()))?;
                let listener =
                    bind_unix(path).map_err(listen_error(settings.listen.to_string()))?;
                Bound::Unix(listener)
            }
        };
        let probes =
            match settings.metrics_listen {
                Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(
                    |source| BindError {
                        addr: addr.to_string(),
                        setting: "--metrics-listen / BROKER_METRICS_LISTEN",
                        source,
                    },
                )?),
                None => None,
            };
        Ok(Self { grpc, probes })
    }

    /// The gRPC address (TCP only), e.g. after binding port 0.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        match &self.grpc {
            Bound::Tcp(listener) => listener.local_addr().ok(),
            Bound::Unix(_) => None,
        }
    }

    /// The metrics and probes address, if one was asked for.
    pub fn probes_addr(&self) -> Option<SocketAddr> {
        self.probes.as_ref()?.local_addr().ok()
    }
}

/// The longest socket path the kernel binds (`sun_path` less its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Binds a unix socket at `path` that has its final mode (`open_to_group`)
/// from the moment it is there: it is bound in a new directory beside
/// `path` that only the broker's user may enter, opened to the group
/// there, and linked into place. Bound at `path` and changed after, it
/// would be, for that moment, as open as the umask leaves it (to anyone,
/// under umask 0), and a change of mode by path would follow a symlink put
/// there meanwhile. A socket path too long to bind from that directory
/// (within 15 bytes of the kernel's 107) is bound in place. A broker
/// killed while binding leaves its directory (`.sb-RANDOM`) behind.
fn bind_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    // A link has no such bound: checked here, or a longer path would get a
    // socket file nobody can connect to.
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the socket path is {len} bytes; the kernel takes at most {MAX_SOCKET_PATH}"),
        ));
    }
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let staging = make_staging_dir(parent)?;
    let staged = staging.join("s");
    let bound = tokio::net::UnixListener::bind(&staged).and_then(|listener| {
        open_to_group(&staged)?;
        // A link, not a rename: it fails if something took the path since
        // it was found free (another broker starting at the same time),
        // as a bind there would.
        std::fs::hard_link(&staged, path).map_err(|error| match error.kind() {
            io::ErrorKind::AlreadyExists => io::Error::new(
                io::ErrorKind::AddrInUse,
                "something was put at the path while binding (another broker?)",
            ),
            _ => error,
        })?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&staging);
    match bound {
        Err(error) if error.kind() == io::ErrorKind::InvalidInput => {
            tracing::warn!(
                path = %path.display(),
                "the socket path is too long to bind it elsewhere first: bound in place, \
                 open to what the umask allows until its mode is set"
            );
            let listener = tokio::net::UnixListener::bind(path)?;
            open_to_group(path)?;
            Ok(listener)
        }
        bound => bound,
    }
}

/// A new directory in `parent` that only this user may enter, named at
/// random so that brokers starting together (each PID 1 in its container,
/// say) never share one: made with `create`, which fails if the name is
/// taken, and tried again with another.
fn make_staging_dir(parent: &Path) -> io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut tries = 0;
    loop {
        // Short: the socket's path in it must stay within the kernel's
        // bound, and the fallback (binding in place) is left to paths
        // within a few bytes of it.
        let name = format!(".sb-{:08x}", fastrand::u32(..));
        let staging = parent.join(name);
        match std::fs::DirBuilder::new().mode(0o700).create(&staging) {
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists && tries < 8 => tries += 1,
            made => return made.map(|()| staging),
        }
    }
}

/// Connecting to a unix socket needs write access to its file, which the
/// process's umask decides (systemd's `UMask=0077` left it to the broker's
/// own user): it is made read-write for its owner and group, so that the
/// services allowed in (members of the broker's group) can connect, and
/// nobody else.
fn open_to_group(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
}

/// A socket file left by a broker that did not stop cleanly blocks `bind`:
/// it is removed, unless something still answers on it (another broker
/// would be silently cut off from its callers). Anything else at that path
/// is refused by name.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    "another process is listening on this socket (another broker?)",
                ));
            }
            std::fs::remove_file(path)
        }
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};

    use super::*;

    /// The socket is there with its final mode and answers; nothing of the
    /// directory it was bound in is left beside it. Something put at the
    /// path meanwhile is not replaced.
    #[tokio::test]
    async fn a_unix_socket_is_put_in_place_open_to_the_group() {
        let dir = std::env::temp_dir().join(format!("bind-test-{}", fastrand::u64(..)));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("broker.sock");
        let listener = bind_unix(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        let entries: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(entries.len(), 1, "only the socket: {entries:?}");
        let (connected, accepted) =
            tokio::join!(tokio::net::UnixStream::connect(&path), listener.accept());
        connected.unwrap();
        accepted.unwrap();
        let taken = dir.join("taken.sock");
        std::fs::write(&taken, "not a socket").unwrap();
        let refused = bind_unix(&taken).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::AddrInUse, "{refused}");
        assert_eq!(std::fs::read_to_string(&taken).unwrap(), "not a socket");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A path too long for the staging directory (but not for the kernel)
    /// is still bound, in place.
    #[tokio::test]
    async fn a_long_socket_path_is_bound_in_place() {
        let top = std::env::temp_dir().join(format!("bind-test-{}", fastrand::u64(..)));
        // 95 bytes of directory: the staging directory's socket would take
        // more than the kernel's 107 (110), the socket's own path takes 101.
        let room = 95 - top.as_os_str().len() - 1;
        let dir = top.join("d".repeat(room));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("b.sock");
        let _listener = bind_unix(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o660);
        // Past the kernel's bound: refused, not a file nobody can reach.
        let too_long = dir.join("b".repeat(107 - dir.as_os_str().len()));
        let refused = bind_unix(&too_long).unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidInput, "{refused}");
        assert!(!too_long.exists());
        std::fs::remove_dir_all(&top).unwrap();
    }
}
