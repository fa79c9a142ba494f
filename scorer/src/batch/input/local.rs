//! A local file's change time (`ctime`): what tells a file rewritten in place from the
//! version a run listed. object_store's version of a local file (its ETag) is the inode, the
//! size and the modification time to the microsecond, and a copy over the old file that
//! keeps its timestamps (`cp -p`, `rsync --inplace -t`, a restore from backup) can leave all
//! three as they were. The kernel sets the change time to the current time on every write
//! and every metadata change, and no system call sets it back, so a version that includes it
//! changes whenever the content can have.

use std::path::PathBuf;

/// A local file's change time when it was listed, and where to look at it again.
#[derive(Debug, Clone)]
pub(super) struct Stamp {
    path: PathBuf,
    changed: ChangeTime,
}

/// Seconds and nanoseconds since the epoch.
type ChangeTime = (i64, i64);

impl Stamp {
    /// The file at `path` as it is now; `None` where the platform has no change time.
    pub(super) async fn of(path: PathBuf) -> std::io::Result<Option<Self>> {
        let metadata = tokio::fs::metadata(&path).await?;
        Ok(change_time(&metadata).map(|changed| Self { path, changed }))
    }

    /// The version the run records for the file: the store's `e_tag` and the change time.
    pub(super) fn version(&self, e_tag: &str) -> String {
        let (seconds, nanos) = self.changed;
        format!("{e_tag}+c{seconds}.{nanos:09}")
    }

    /// Whether the file has not changed since it was listed: checked after reading it, so
    /// bytes read from a file that changed before or while they were read are never used
    /// as the listed version's.
    pub(super) async fn unchanged(&self) -> std::io::Result<bool> {
        let metadata = tokio::fs::metadata(&self.path).await?;
        Ok(change_time(&metadata) == Some(self.changed))
    }
}

#[cfg(unix)]
fn change_time(metadata: &std::fs::Metadata) -> Option<ChangeTime> {
    use std::os::unix::fs::MetadataExt;
    Some((metadata.ctime(), metadata.ctime_nsec()))
}

#[cfg(not(unix))]
fn change_time(_metadata: &std::fs::Metadata) -> Option<ChangeTime> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rewrite_that_restores_size_and_modification_time_still_changes_the_stamp() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.parquet");
        std::fs::write(&path, b"version one").expect("write");
        let listed = Stamp::of(path.clone())
            .await
            .expect("stat")
            .expect("unix has a change time");
        let before = std::fs::metadata(&path).expect("stat");
        let version = listed.version("\"etag\"");
        assert!(listed.unchanged().await.expect("stat"), "nothing happened");

        // The change time has a clock tick's resolution: wait past it.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"version two").expect("rewrite in place");
        let file = std::fs::File::options()
            .write(true)
            .open(&path)
            .expect("open");
        file.set_modified(before.modified().expect("mtime"))
            .expect("restore the modification time");
        let after = std::fs::metadata(&path).expect("stat");
        assert_eq!(
            (after.len(), after.modified().expect("mtime")),
            (before.len(), before.modified().expect("mtime")),
            "the premise: size and modification time as listed"
        );

        assert!(!listed.unchanged().await.expect("stat"));
        let now = Stamp::of(path).await.expect("stat").expect("stamp");
        assert_ne!(now.version("\"etag\""), version);
    }

    #[tokio::test]
    async fn a_file_gone_since_it_was_listed_is_an_error_not_unchanged() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("t.parquet");
        std::fs::write(&path, b"x").expect("write");
        let listed = Stamp::of(path.clone()).await.expect("stat").expect("stamp");
        std::fs::remove_file(&path).expect("remove");
        assert!(listed.unchanged().await.is_err());
    }
}
