//! Ctrl-C for long-running beds (the demo): the first one asks the bed to stop, so that it
//! unwinds and every destructor (containers, VMs, daemons, namespaces, scratch files) runs;
//! a second one removes the namespaces at once and exits.

use std::sync::atomic::{AtomicBool, Ordering};

use crate::Error;

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C handler (once per process).
pub fn install() -> Result<(), Error> {
    ctrlc::set_handler(|| {
        if REQUESTED.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: removing the namespaces and exiting");
            crate::netns::remove_all();
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: cleaning up (Ctrl-C again to exit at once)");
    })
    .map_err(|e| Error::Setup(format!("Ctrl-C handler: {e}")))
}

/// Whether Ctrl-C was pressed.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// `Err(Error::Interrupted)` once Ctrl-C was pressed: the `?` that stops a bed between steps.
pub fn check() -> Result<(), Error> {
    if requested() {
        Err(Error::Interrupted)
    } else {
        Ok(())
    }
}
