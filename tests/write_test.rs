//! `[resources] write_test = false`: the agent writes nothing in the data
//! dir (its mtime, which every file made or removed in it moves, stays put;
//! nothing else writes there), `nodescope_datadir_writable` is absent, and
//! the data dir is still measured. With the test on, the same watch moves
//! the mtime within seconds. And whatever it does there, the agent never
//! opens a wallet file.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn mtime(dir: &Path) -> (i64, i64) {
    let m = std::fs::metadata(dir).unwrap();
    (m.mtime(), m.mtime_nsec())
}

fn figure(m: &str, name: &str) -> Option<f64> {
    m.lines().filter(|l| l.starts_with(&format!("{name}{{"))).find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
}

/// Watches a `sleep` whose "data dir" is `datadir`, with `resources` as the
/// [resources] table and `target` as more lines of its target, for 4 s
/// after the first size figure: whether the data dir's mtime moved, and the
/// last scrape.
fn watch(datadir: &Path, resources: &str, target: &str) -> (bool, String) {
    let mut node = Command::new("sleep").arg("60").stdin(Stdio::null()).spawn().unwrap();
    let pid_file = datadir.parent().unwrap().join(format!("{}.pid", node.id()));
    std::fs::write(&pid_file, format!("{}\n", node.id())).unwrap();
    let before = mtime(datadir);
    let agent = Agent::start(&format!(
        "[agent]\ninterval = \"250ms\"\n\n[resources]\n{resources}\n\n[[targets]]\nname = \"n\"\npid_file = \"{}\"\ndatadir = \"{}\"\n{target}",
        pid_file.display(),
        datadir.display()
    ));
    wait_for("the data dir measured", Duration::from_secs(20), || {
        figure(&agent.metrics(), "nodescope_datadir_size_bytes")
    });
    std::thread::sleep(Duration::from_secs(4));
    let m = agent.metrics();
    drop(agent);
    stop_child(&mut node, Duration::from_secs(2));
    (mtime(datadir) != before, m)
}

#[test]
fn write_test_off_writes_nothing_in_the_data_dir() {
    require_root();
    let tmp = TempDir::new("write-test");
    let datadir = tmp.path().join("data");
    std::fs::create_dir(&datadir).unwrap();
    std::fs::write(datadir.join("blk00000.dat"), vec![1u8; 4096]).unwrap();

    let (moved, m) = watch(&datadir, "write_test = false", "");
    assert!(!moved, "the data dir was written with write_test = false");
    assert_eq!(figure(&m, "nodescope_datadir_writable"), None, "{m}");
    let du = Command::new("du").arg("-sb").arg(&datadir).output().unwrap();
    let du: f64 = String::from_utf8_lossy(&du.stdout).split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(figure(&m, "nodescope_datadir_size_bytes"), Some(du), "still measured, as du -sb");

    let (moved, m) = watch(&datadir, "datadir_write_test = \"1s\"", "");
    assert!(moved, "the write test did not touch the data dir");
    assert_eq!(figure(&m, "nodescope_datadir_writable"), Some(1.0), "{m}");
}

/// The agent never opens a node's wallet files: with a litecoin data dir
/// holding a legacy `wallet.dat` and a `wallets/` directory, watched (size
/// walk, write test, the node's log followed) for 4 s, inotify sees no
/// open or read of them (and it does see the test's own open at the end,
/// so the watch works).
#[test]
fn the_agent_never_opens_wallet_files() {
    require_root();
    let tmp = TempDir::new("wallets");
    let datadir = tmp.path().join("data");
    std::fs::create_dir_all(datadir.join("wallets/main")).unwrap();
    std::fs::write(datadir.join("debug.log"), "2026-11-30T08:00:00Z Litecoin Core version v0.21.4\n").unwrap();
    let wallets = [datadir.join("wallet.dat"), datadir.join("wallets/main/wallet.dat")];
    for w in &wallets {
        std::fs::write(w, vec![7u8; 8192]).unwrap();
    }
    // SAFETY: plain inotify calls on paths and a buffer this test owns
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    for w in &wallets {
        let path = std::ffi::CString::new(w.to_str().unwrap()).unwrap();
        let wd = unsafe { libc::inotify_add_watch(fd, path.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) };
        assert!(wd >= 0, "inotify_add_watch {}", w.display());
    }
    let events = || {
        let mut buf = [0u8; 4096];
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        n.max(0) as usize
    };

    let (_, m) = watch(&datadir, "datadir_write_test = \"1s\"", "chain = \"litecoin\"\n");
    let seen = events();
    assert_eq!(seen, 0, "the agent opened or read a wallet file");
    // the walk did cover the wallets' bytes (by their size, not their contents)
    assert!(figure(&m, "nodescope_datadir_size_bytes").is_some_and(|s| s >= 2.0 * 8192.0), "{m}");
    // the watch works: an open of the wallet is seen
    drop(std::fs::File::open(&wallets[1]).unwrap());
    assert!(events() > 0, "inotify saw the test's own open");
    unsafe { libc::close(fd) };
}
