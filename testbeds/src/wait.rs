//! Waiting for events: a condition polled until it holds or a generous deadline passes. Tests
//! wait for what they need (a counter, a file, a listening socket), never for a fixed time
//! or a number of tries, so they pass on fast, slow and loaded machines alike.

use std::time::{Duration, Instant};

use crate::Error;

/// The deadline for things that happen within a moment on a quiet machine (a counter moves,
/// a socket listens, an interface goes away): generous, for a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(30);

/// Polls `done` every few milliseconds until it returns true or `timeout` passes; the error
/// names `what` was awaited. Ctrl-C ends the wait ([`crate::interrupt`]).
pub fn until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) -> Result<(), Error> {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return Ok(());
        }
        crate::interrupt::check()?;
        if Instant::now() > deadline {
            return Err(Error::Setup(format!(
                "timed out after {} s waiting for {what}",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
