//! Discovery's parsers of what a node leaves in /proc and its config file:
//! the input is a config file text (bitcoin.conf, litecoin.conf or
//! bitmonero.conf syntax), then NUL-separated command-line arguments as
//! /proc/PID/cmdline holds them; its first byte picks the chain. The same
//! bytes go to the /proc/PID/net/tcp LISTEN row parser, the environ and
//! passwd home lookups and the uid_map reader. Never panics; ports read
//! from settings are never 0 (0 means unset).
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodescope::chain::Chain;
use nodescope::discovery::{
    home_from_environ, home_from_passwd, listen_rows, nul_separated, parse_node_settings, uid_inside,
};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let chain = [Chain::Bitcoin, Chain::Litecoin, Chain::Monero][usize::from(pick) % 3];
    let text = String::from_utf8_lossy(rest);
    let (config, cmdline) = text.split_once('\0').unwrap_or((&text, ""));
    let args: Vec<String> =
        nul_separated(cmdline.as_bytes()).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
    let settings = parse_node_settings(chain, &args, config);
    assert_ne!(settings.p2p_port, Some(0));
    assert!(!settings.rpc_ports.contains(&0));

    let _ = listen_rows(&text).count();
    let _ = home_from_environ(rest);
    let uid = u32::from(pick) * 1000;
    let _ = home_from_passwd(&text, uid_inside(&text, uid));
});
