//! vblock: offline tools for a pool file or device that no vblockd is serving.
//!
//! `vblock check PATH [--repair]` opens the pool (recovering it after a crash), verifies
//! every reference and checksum, reports leaks and, with `--repair`, reclaims them. Exit code
//! 0: clean (or repaired), 1: problems found, 2: not a pool or unreadable.

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
    /// Verify a pool; with --repair, reclaim leaked space.
    Check {
        path: PathBuf,
        #[arg(long)]
        repair: bool,
    },
}

fn main() -> ExitCode {
    let Command::Check { path, repair } = Cli::parse().command;
    let pool = match UringDevice::open(&path).and_then(Pool::open) {
        Ok(p) => p,
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
    if let Err(e) = pool.close() {
        eprintln!("vblock: closing {}: {e}", path.display());
        return ExitCode::from(2);
    }
    if report.problems.is_empty() && (repair || report.leaked_clusters == 0) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
