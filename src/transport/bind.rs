//! Binding the sockets the settings name: the gRPC listener (TCP or a
//! unix socket, whose file is made ready for its callers) and the probes
//! port. Apart from building the app, so that a test can bind port 0 and
//! learn the address before the broker is built.

use std::net::SocketAddr;

use crate::{
    config::{ListenAddr, Settings},
    transport::listener::Bound,
};

/// A socket that could not be bound.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    addr: String,
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
        let listen_error = |addr: String| move |source| BindError { addr, source };
        let grpc = match &settings.listen {
            ListenAddr::Tcp(addr) => Bound::Tcp(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(listen_error(addr.to_string()))?,
            ),
            ListenAddr::Unix(path) => {
                remove_stale_socket(path).map_err(listen_error(settings.listen.to_string()))?;
                let listener = tokio::net::UnixListener::bind(path)
                    .map_err(listen_error(settings.listen.to_string()))?;
                open_to_group(path).map_err(listen_error(settings.listen.to_string()))?;
                Bound::Unix(listener)
            }
        };
        let probes = match settings.metrics_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(listen_error(addr.to_string()))?,
            ),
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

/// Connecting to a unix socket needs write access to its file, which the
/// process's umask decides (systemd's `UMask=0077` left it to the broker's
/// own user): it is made read-write for its owner and group, so that the
/// services allowed in (members of the broker's group) can connect, and
/// nobody else.
fn open_to_group(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
}

/// A socket file left by a broker that did not stop cleanly blocks `bind`:
/// it is removed, unless something still answers on it (another broker
/// would be silently cut off from its callers). Anything else at that path
/// is refused by name.
fn remove_stale_socket(path: &std::path::Path) -> std::io::Result<()> {
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
