//! vblock: offline tools for a pool file or device that no vblockd is serving.
//!
//! `vblock check PATH` opens the pool read-only (under a shared lock; what a crash left in
//! the journal is replayed in memory, never written), verifies every reference and checksum
//! and reports leaks; it changes nothing. `--repair` opens it like any writer (exclusively)
//! and reclaims leaks. A pool that vblockd serves is refused (check it through the daemon:
//! `vctl pool check NAME`). Exit code 0: clean (or repaired), 1: problems found, 2: not a
//! pool, unreadable or in use.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vblock::Pool;
use vblock::uring::UringDevice;

#[derive(Parser)]
#[command(name = "vblock", version, about = "Offline tools for vblock pools")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Verify a pool without changing it; with --repair, reclaim leaked space.
    Check {
        /// The pool file or device (not served by a vblockd).
        path: PathBuf,
        /// Reclaim leaked space (opens the pool for writing).
        #[arg(long)]
        repair: bool,
    },
}

fn main() -> ExitCode {
    let Command::Check { path, repair } = Cli::parse().command;
    let opened = if repair {
        UringDevice::open(&path).and_then(Pool::open)
    } else {
        UringDevice::open_read_only(&path).and_then(Pool::open_read_only)
    };
    let pool = match opened {
        Ok(p) => p,
        Err(e @ vblock::Error::InUse(_)) => {
            eprintln!(
                "vblock: {e}; if vblockd serves it, check it through the daemon: vctl pool \
                 check NAME"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("vblock: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    let report = match pool.check(repair) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vblock: {}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    println!(
        "{}: {} volumes, {}/{} clusters used, {} leaked{}",
        path.display(),
        report.volumes,
        report.used_clusters,
        report.total_clusters,
        report.leaked_clusters,
        if repair && report.leaked_clusters > 0 {
            " (reclaimed)"
        } else {
            ""
        }
    );
    for p in &report.problems {
        println!("problem: {p}");
    }
    if repair && let Err(e) = pool.close() {
        eprintln!("vblock: closing {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if report.problems.is_empty() && (repair || report.leaked_clusters == 0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
