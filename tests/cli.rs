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
