//! Scratch directories for tests and benchmarks: uniquely named, removed when dropped (also
//! when a test fails and unwinds).

use std::path::{Path, PathBuf};

use crate::Error;

/// A directory `BASE/NAME-PID`, created empty and removed with everything in it on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    /// Creates `base/name-<pid>` (emptied first if a crashed run left it).
    pub fn new(base: &Path, name: &str) -> Result<Scratch, Error> {
        let dir = base.join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| Error::Io(dir.display().to_string(), e))?;
        Ok(Scratch(dir))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// A path inside the directory.
    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
