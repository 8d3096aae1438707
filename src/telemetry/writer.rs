//! The log writer: events are appended to a shared buffer and a thread
//! writes the buffer out in batches.
//!
//! Why not a channel of lines: with one audit line per call, a queue that
//! wakes its writer for every line costs a wake-up, a context switch and a
//! `write` per call when calls come one at a time, and a copy of the line
//! into a fresh allocation always. Here a line is one append under a mutex
//! into a buffer that is reused; the writer wakes every `FLUSH_EVERY`, or
//! at once when the buffer passes `WAKE_AT`, swaps the buffer for its spare
//! and writes it with one call. A line reaches the output within
//! `FLUSH_EVERY`, and at once on shutdown (the guard's drop).
//!
//! Nothing is dropped: past `MAX_PENDING` a caller waits for the writer.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// How often the writer thread writes out what is pending.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Pending bytes that wake the writer before its time.
const WAKE_AT: usize = 64 * 1024;
/// Pending bytes past which callers wait.
const MAX_PENDING: usize = 8 * 1024 * 1024;

/// Shared between the callers and the writer thread.
struct Shared {
    state: Mutex<Pending>,
    /// The writer waits on it for work, callers for room.
    changed: Condvar,
}

struct Pending {
    bytes: Vec<u8>,
    /// The writer was woken for these bytes: a wake-up is a futex call,
    /// so only the line that passes `WAKE_AT` makes it, not every line
    /// until the writer gets a core.
    woken: bool,
    stopping: bool,
}

/// Makes the writers `tracing` writes each event through; cheap to clone.
#[derive(Clone)]
pub(super) struct BufferedLog {
    shared: Arc<Shared>,
}

/// Stops the writer thread when dropped, after it wrote out everything.
pub(super) struct WriterGuard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `output`.
pub(super) fn start(output: impl Write + Send + 'static) -> (BufferedLog, WriterGuard) {
    let shared = Arc::new(Shared {
        state: Mutex::new(Pending {
            bytes: Vec::with_capacity(WAKE_AT),
            woken: false,
            stopping: false,
        }),
        changed: Condvar::new(),
    });
    let writer = Arc::clone(&shared);
    let thread = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || write_out(&writer, output))
        .expect("the log writer thread starts");
    (
        BufferedLog {
            shared: Arc::clone(&shared),
        },
        WriterGuard {
            shared,
            thread: Some(thread),
        },
    )
}

/// The writer thread: swaps the pending bytes for its spare buffer and
/// writes them, every `FLUSH_EVERY` or when woken, until stopped.
fn write_out(shared: &Shared, mut output: impl Write) {
    let mut spare = Vec::with_capacity(WAKE_AT);
    loop {
        let stopping = {
            let state = lock(shared);
            let (mut state, _) = shared
                .changed
                .wait_timeout_while(state, FLUSH_EVERY, |s| {
                    s.bytes.len() < WAKE_AT && !s.stopping
                })
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            std::mem::swap(&mut state.bytes, &mut spare);
            state.woken = false;
            state.stopping
        };
        // Callers waiting for room may go on.
        shared.changed.notify_all();
        if !spare.is_empty() {
            // A log that cannot be written has nowhere to report it.
            let _ = output.write_all(&spare).and_then(|()| output.flush());
            spare.clear();
        }
        if stopping && lock(shared).bytes.is_empty() {
            return;
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, Pending> {
    // A panic while holding the lock leaves whole lines behind: go on.
    shared
        .state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Drop for WriterGuard {
    fn drop(&mut self) {
        lock(&self.shared).stopping = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl<'a> MakeWriter<'a> for BufferedLog {
    type Writer = &'a BufferedLog;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Write for &BufferedLog {
    /// One formatted event: appended whole, so lines never interleave.
    fn write(&mut self, event: &[u8]) -> io::Result<usize> {
        let shared = &self.shared;
        let mut state = lock(shared);
        while state.bytes.len() >= MAX_PENDING && !state.stopping {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        state.bytes.extend_from_slice(event);
        let wake = state.bytes.len() >= WAKE_AT && !state.woken;
        state.woken |= wake;
        drop(state);
        if wake {
            shared.changed.notify_all();
        }
        Ok(event.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An output the test can read after the writer stopped.
    #[derive(Clone, Default)]
    struct Output(Arc<Mutex<Vec<u8>>>);

    impl Write for Output {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_come_out_whole_in_order_and_all_by_shutdown() {
        let output = Output::default();
        let (log, guard) = start(output.clone());
        let writers: Vec<_> = (0..4)
            .map(|thread| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        let line = format!("thread {thread} line {i:05}\n");
                        (&log).write_all(line.as_bytes()).unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        drop(guard);
        let text = String::from_utf8(output.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 20_000, "nothing lost");
        for thread in 0..4 {
            let mine: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(&format!("thread {thread} ")))
                .collect();
            assert_eq!(mine.len(), 5_000);
            assert!(mine.windows(2).all(|w| w[0] < w[1]), "in order");
        }
    }

    #[test]
    fn a_quiet_line_is_out_within_the_flush_interval() {
        let output = Output::default();
        let (log, _guard) = start(output.clone());
        (&log).write_all(b"one line\n").unwrap();
        std::thread::sleep(FLUSH_EVERY * 4);
        assert_eq!(output.0.lock().unwrap().as_slice(), b"one line\n");
    }
}
