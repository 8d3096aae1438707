//! A budget of log lines per window, for events that can come in
//! crowds (a role losing its grant over every cached secret, an upstream
//! failing and answering in turns): past the budget they go to DEBUG, and
//! the next line written says how many were held back, so that the log
//! stays readable and nothing is silently lost from it.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// At most `lines` lines per `window`.
pub(crate) struct LineBudget {
    window: Duration,
    lines: u32,
    state: Mutex<Spent>,
}

#[derive(Default)]
struct Spent {
    since: Option<Instant>,
    lines: u32,
    held_back: u64,
}

impl LineBudget {
    pub(crate) fn new(window: Duration, lines: u32) -> Self {
        Self {
            window,
            lines,
            state: Mutex::new(Spent::default()),
        }
    }

    /// `Some(lines held back since the last one written)` when a line may
    /// be written now; `None` (and it is counted) when not.
    pub(crate) fn take(&self) -> Option<u64> {
        let now = Instant::now();
        let mut spent = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if spent
            .since
            .is_none_or(|since| now.duration_since(since) >= self.window)
        {
            spent.since = Some(now);
            spent.lines = 0;
        }
        if spent.lines >= self.lines {
            spent.held_back += 1;
            return None;
        }
        spent.lines += 1;
        Some(std::mem::take(&mut spent.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_bounded_per_window_and_say_what_was_held_back() {
        let budget = LineBudget::new(Duration::from_secs(2), 3);
        assert_eq!(budget.take(), Some(0));
        assert_eq!(budget.take(), Some(0));
        assert_eq!(budget.take(), Some(0));
        for _ in 0..400 {
            assert_eq!(budget.take(), None);
        }
        // The window passes: the next line says how many were held back.
        std::thread::sleep(Duration::from_millis(2100));
        assert_eq!(budget.take(), Some(400));
        assert_eq!(budget.take(), Some(0));
    }
}
