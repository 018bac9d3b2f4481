//! The command line: bad configs are refused with exit 2 and a one-line
//! message naming the key, by both `check-config` and `run`.

use std::process::Command;

fn nodescope(args: &[&str], config: &str) -> (i32, String) {
    let dir = std::env::temp_dir().join(format!("nodescope-cli-{}-{}", std::process::id(), config.len()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_nodescope")).args(args).arg(&file).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).to_string())
}

const BAD: &[(&str, &str)] = &[
    ("[http]\nlisten = \"127.0.0.1:9464\"\nlistne = 1\n", "listne"),
    ("[http]\nlisten = \"not-an-address\"\n", "http.listen"),
    ("[[targets]]\nname = \"ltc\"\nchain = \"litecoin\"\n", "targets[0]"),
    ("[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\np2p_ports = [0]\n", "targets[0].p2p_ports"),
    ("[limits]\ntop_peers = 0\n", "limits.top_peers"),
    ("[rules.no_such_rule]\nenabled = true\n", "rules.no_such_rule"),
    ("[rules.no_peers]\nfor = \"-5s\"\n", "rules.no_peers.for"),
    ("[rules.disk_low]\nthreshold = 120\n", "rules.disk_low.threshold"),
    ("[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\n[targets.rules.memory_high]\nthreshold = 100.5\n", "targets[0].rules.memory_high.threshold"),
    ("[[targets]]\nname = \"ltc\"\nprocess = \"litecoind\"\n[targets.rules.no_outbound]\nclear_after = \"-1m\"\n", "targets[0].rules.no_outbound.clear_after"),
];

#[test]
fn bad_configs_exit_2_naming_the_key() {
    for (config, key) in BAD {
        for args in [&["check-config"][..], &["run", "--config"][..]] {
            let (code, err) = nodescope(args, config);
            assert_eq!(code, 2, "{args:?} on {config:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
            assert!(err.contains(key), "{args:?} on {config:?}: message does not name {key}: {err}");
        }
    }
}

#[test]
fn good_config_passes_check() {
    let (code, err) = nodescope(
        &["check-config"],
        "[http]\nlisten = \"127.0.0.1:9464\"\n[[targets]]\nname = \"ltc\"\npid_file = \"/data/ltc/regtest/litecoind.pid\"\nchain = \"litecoin\"\ndatadir = \"/data/ltc\"\np2p_ports = [19444]\n",
    );
    assert_eq!(code, 0, "{err}");
}

/// Under systemd the agent says READY=1 once its first collection is done and
/// pings the watchdog every loop: checked with our own NOTIFY_SOCKET listener
/// (systemd is not PID 1 on the test machines).
#[test]
fn systemd_notify_ready_and_watchdog() {
    use std::os::unix::net::UnixDatagram;
    let dir = std::env::temp_dir().join(format!("nodescope-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock_path = dir.join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(std::time::Duration::from_secs(20))).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.join("c.toml");
    std::fs::write(&config, format!("[http]\nlisten = \"127.0.0.1:{port}\"\n[agent]\ninterval = \"200ms\"\ndiscover = false\n")).unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: exec keeps the shell's
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" run --config \"$1\""])
        .arg(env!("CARGO_BIN_EXE_nodescope"))
        .arg(&config)
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "1000000")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !(seen.iter().any(|m: &String| m.contains("READY=1")) && seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2) {
        match sock.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).to_string()),
            Err(e) => {
                seen.push(format!("recv failed: {e}"));
                break;
            }
        }
    }
    // SAFETY: our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(seen.first().is_some_and(|m| m.contains("READY=1")), "first message should be READY=1: {seen:?}");
    assert!(seen.iter().filter(|m| m.contains("WATCHDOG=1")).count() >= 2, "{seen:?}");
    assert!(status.success(), "agent exit on SIGTERM: {status}");
}
