//! File descriptors: every connection holds one, and when the process's
//! limit (`RLIMIT_NOFILE`) runs out before `--max-connections` does, accept
//! fails, and the connection slots (and their hand-over from connections
//! still opening, `opening_slots`) never come into play: a peer holding
//! sockets locks everyone out. Many systems start a process with a soft
//! limit of 1,024.
//!
//! So at start the soft limit is raised as far as the hard limit allows,
//! and if that is still short, the connection limit is lowered to fit, with
//! a warning that says what to raise.

use crate::config::Limits;

/// Descriptors the broker needs besides the gRPC connections: the
/// listeners, probe connections (at most 64), the upstream's connection
/// pool, watched files, the runtime's own.
pub const BESIDES_CONNECTIONS: u64 = 512;

/// What `fit_connections` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// The soft limit now in force.
    pub limit: u64,
    /// The connections that fit in it.
    pub connections: usize,
}

/// Raises the soft descriptor limit towards what `limits` need, and says
/// how many connections fit; `None` when the limit cannot be read.
pub fn fit_connections(limits: &Limits) -> Option<Descriptors> {
    let wanted = (limits.max_connections as u64).saturating_add(BESIDES_CONNECTIONS);
    let limit = rlimit::increase_nofile_limit(wanted).ok()?;
    Some(Descriptors {
        limit,
        connections: connections_within(limit, limits.max_connections),
    })
}

/// The connections `limit` descriptors leave room for, at most `wanted`
/// (and at least one).
fn connections_within(limit: u64, wanted: usize) -> usize {
    let room = limit.saturating_sub(BESIDES_CONNECTIONS).max(1);
    usize::try_from(room).unwrap_or(usize::MAX).min(wanted)
}

impl Descriptors {
    /// The warning to give when the connection limit had to be lowered.
    pub fn shortfall(&self, wanted: usize) -> Option<String> {
        (self.connections < wanted).then(|| {
            format!(
                "the open-files limit (RLIMIT_NOFILE) is {}: room for {} connections, not the \
                 {wanted} of max_connections; raise it (LimitNOFILE= for systemd, ulimit -n) \
                 or lower max_connections",
                self.limit, self.connections
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_fit_in_what_the_limit_leaves() {
        assert_eq!(connections_within(1024, 10_000), 512);
        assert_eq!(connections_within(1_048_576, 10_000), 10_000);
        assert_eq!(connections_within(100, 10_000), 1);
        let short = Descriptors {
            limit: 1024,
            connections: 512,
        };
        let warning = short.shortfall(10_000).unwrap();
        assert!(warning.contains("is 1024: room for 512 connections, not the 10000"));
        assert!(short.shortfall(512).is_none());
    }
}
