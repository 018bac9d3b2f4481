//! The chains nodescope understands and the facts about each that it needs to
//! find and read a node from outside: process names, default ports, block
//! interval and data directory layout.

use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Chain {
    Bitcoin,
    Litecoin,
    Monero,
    /// Any other node: watched by process and ports alone, with no chain knowledge.
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    Main,
    Test,
    Signet,
    Regtest,
    Stagenet,
}

/// Which network a peer is reached over. Clearnet peers are ipv4/ipv6;
/// peers behind the node's configured proxies and onion/I2P listeners are
/// named by what the node told that proxy or listener to carry: the kernel
/// only sees the local proxy, never the onion or I2P address behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PeerNetwork {
    Ipv4,
    Ipv6,
    Onion,
    I2p,
    /// A general SOCKS proxy (`-proxy`, monerod `--proxy`): clearnet and
    /// onion peers alike.
    Proxy,
}

impl PeerNetwork {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerNetwork::Ipv4 => "ipv4",
            PeerNetwork::Ipv6 => "ipv6",
            PeerNetwork::Onion => "onion",
            PeerNetwork::I2p => "i2p",
            PeerNetwork::Proxy => "proxy",
        }
    }

    /// Reached through a proxy or an onion/I2P listener, not directly.
    pub fn is_proxied(self) -> bool {
        matches!(self, PeerNetwork::Onion | PeerNetwork::I2p | PeerNetwork::Proxy)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ports {
    pub p2p: u16,
    pub rpc: u16,
}

/// The chains a process name can belong to; Generic never matches a name.
const NAMED_CHAINS: [Chain; 3] = [Chain::Bitcoin, Chain::Litecoin, Chain::Monero];

impl Chain {
    /// The chains whose nodes have known process names.
    pub const ALL: [Chain; 3] = NAMED_CHAINS;

    /// The same spelling serde uses, so labels and config files agree.
    pub fn as_str(self) -> &'static str {
        match self {
            Chain::Bitcoin => "bitcoin",
            Chain::Litecoin => "litecoin",
            Chain::Monero => "monero",
            Chain::Generic => "generic",
        }
    }

    /// Process names (the /proc/PID/comm value, which the kernel truncates to
    /// 15 bytes) that run this chain. Generic: none.
    pub fn process_names(self) -> &'static [&'static str] {
        match self {
            Chain::Bitcoin => &["bitcoind", "bitcoin-qt"],
            Chain::Litecoin => &["litecoind", "litecoin-qt"],
            Chain::Monero => &["monerod"],
            Chain::Generic => &[],
        }
    }

    /// Which chain a process name (comm) belongs to.
    pub fn from_process_name(comm: &str) -> Option<Chain> {
        // Tolerate the newline the kernel puts after comm so callers can pass
        // the file's contents straight through.
        let comm = comm.strip_suffix('\n').unwrap_or(comm);
        NAMED_CHAINS.into_iter().find(|chain| chain.process_names().contains(&comm))
    }

    /// The chain's default P2P and RPC ports on a network, or None for Generic
    /// and for networks the chain does not have.
    pub fn default_ports(self, net: Network) -> Option<Ports> {
        use Network::*;
        let (p2p, rpc) = match (self, net) {
            // Bitcoin Core chainparams.cpp (nDefaultPort) and chainparamsbase.cpp (RPC).
            // Test is testnet3; testnet4 (48333/48332) has no Network of its own.
            (Chain::Bitcoin, Main) => (8333, 8332),
            (Chain::Bitcoin, Test) => (18333, 18332),
            (Chain::Bitcoin, Signet) => (38333, 38332),
            (Chain::Bitcoin, Regtest) => (18444, 18443),
            // Litecoin Core 0.21 chainparams.cpp / chainparamsbase.cpp.
            (Chain::Litecoin, Main) => (9333, 9332),
            (Chain::Litecoin, Test) => (19335, 19332),
            // Litecoin Core has no signet consensus params: CreateChainParams
            // hands signet the testnet params, so P2P stays on testnet's 19335,
            // while chainparamsbase gives signet its own RPC port, 39332.
            (Chain::Litecoin, Signet) => (19335, 39332),
            (Chain::Litecoin, Regtest) => (19444, 19443),
            // Monero cryptonote_config.h.
            (Chain::Monero, Main) => (18080, 18081),
            (Chain::Monero, Test) => (28080, 28081),
            (Chain::Monero, Stagenet) => (38080, 38081),
            // Only --testnet and --stagenet switch monerod's default ports
            // (the p2p-bind-port and rpc-bind-port defaults depend on those two
            // flags alone), so --regtest listens on the mainnet ones.
            (Chain::Monero, Regtest) => (18080, 18081),
            _ => return None,
        };
        Some(Ports { p2p, rpc })
    }

    /// Typical time between blocks.
    pub fn block_interval(self) -> Duration {
        Duration::from_secs(match self {
            Chain::Bitcoin => 600,
            Chain::Litecoin => 150,
            Chain::Monero => 120,
            // Bitcoin's pace is the most common among forks we don't know.
            Chain::Generic => 600,
        })
    }

    /// The chain's default base data dir for a user whose home is `home`.
    pub fn default_datadir(self, home: &Path) -> Option<PathBuf> {
        let dir = match self {
            Chain::Bitcoin => ".bitcoin",
            Chain::Litecoin => ".litecoin",
            Chain::Monero => ".bitmonero",
            Chain::Generic => return None,
        };
        Some(home.join(dir))
    }

    /// The subdirectory a network's data lives in under the base data dir
    /// ("" when it lives in the base dir itself, or the chain lacks the network).
    pub fn network_subdir(self, net: Network) -> &'static str {
        use Network::*;
        match (self, net) {
            (Chain::Bitcoin, Test) => "testnet3",
            // Litecoin's current testnet is its fourth; the name is Litecoin's
            // own and unrelated to Bitcoin's testnet4.
            (Chain::Litecoin, Test) => "testnet4",
            (Chain::Bitcoin | Chain::Litecoin, Signet) => "signet",
            (Chain::Bitcoin | Chain::Litecoin, Regtest) => "regtest",
            // monerod appends "testnet"/"stagenet" to --data-dir (given or
            // default) and nothing for --regtest, whose database therefore
            // shares the mainnet dir unless --data-dir moves it.
            (Chain::Monero, Test) => "testnet",
            (Chain::Monero, Stagenet) => "stagenet",
            _ => "",
        }
    }
}

impl Network {
    /// The same spelling serde uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Main => "main",
            Network::Test => "test",
            Network::Signet => "signet",
            Network::Regtest => "regtest",
            Network::Stagenet => "stagenet",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL_CHAINS: [Chain; 4] = [Chain::Bitcoin, Chain::Litecoin, Chain::Monero, Chain::Generic];
    const ALL_NETWORKS: [Network; 5] =
        [Network::Main, Network::Test, Network::Signet, Network::Regtest, Network::Stagenet];

    #[test]
    fn as_str_matches_serde() {
        for chain in ALL_CHAINS {
            assert_eq!(serde_json::to_string(&chain).unwrap(), format!("\"{}\"", chain.as_str()));
            let back: Chain = serde_json::from_str(&format!("\"{}\"", chain.as_str())).unwrap();
            assert_eq!(back, chain);
        }
        for net in ALL_NETWORKS {
            assert_eq!(serde_json::to_string(&net).unwrap(), format!("\"{}\"", net.as_str()));
            let back: Network = serde_json::from_str(&format!("\"{}\"", net.as_str())).unwrap();
            assert_eq!(back, net);
        }
    }

    #[test]
    fn process_names_round_trip() {
        for chain in ALL_CHAINS {
            for name in chain.process_names() {
                assert!(name.len() <= 15, "{name} would be truncated in comm");
                assert_eq!(Chain::from_process_name(name), Some(chain));
            }
        }
        assert_eq!(Chain::from_process_name("monerod\n"), Some(Chain::Monero));
        assert_eq!(Chain::from_process_name("bitcoin-cli"), None);
        assert_eq!(Chain::from_process_name("bitcoind2"), None);
        assert_eq!(Chain::from_process_name(""), None);
        assert!(Chain::Generic.process_names().is_empty());
    }

    #[test]
    fn default_ports() {
        let ports = |c: Chain, n| c.default_ports(n).map(|p| (p.p2p, p.rpc));
        assert_eq!(ports(Chain::Bitcoin, Network::Main), Some((8333, 8332)));
        assert_eq!(ports(Chain::Bitcoin, Network::Test), Some((18333, 18332)));
        assert_eq!(ports(Chain::Bitcoin, Network::Signet), Some((38333, 38332)));
        assert_eq!(ports(Chain::Bitcoin, Network::Regtest), Some((18444, 18443)));
        assert_eq!(ports(Chain::Bitcoin, Network::Stagenet), None);
        assert_eq!(ports(Chain::Litecoin, Network::Main), Some((9333, 9332)));
        assert_eq!(ports(Chain::Litecoin, Network::Test), Some((19335, 19332)));
        assert_eq!(ports(Chain::Litecoin, Network::Signet), Some((19335, 39332)));
        assert_eq!(ports(Chain::Litecoin, Network::Regtest), Some((19444, 19443)));
        assert_eq!(ports(Chain::Litecoin, Network::Stagenet), None);
        assert_eq!(ports(Chain::Monero, Network::Main), Some((18080, 18081)));
        assert_eq!(ports(Chain::Monero, Network::Test), Some((28080, 28081)));
        assert_eq!(ports(Chain::Monero, Network::Stagenet), Some((38080, 38081)));
        assert_eq!(ports(Chain::Monero, Network::Regtest), Some((18080, 18081)));
        assert_eq!(ports(Chain::Monero, Network::Signet), None);
        for net in ALL_NETWORKS {
            assert_eq!(Chain::Generic.default_ports(net), None);
        }
    }

    #[test]
    fn block_intervals() {
        assert_eq!(Chain::Bitcoin.block_interval(), Duration::from_secs(600));
        assert_eq!(Chain::Litecoin.block_interval(), Duration::from_secs(150));
        assert_eq!(Chain::Monero.block_interval(), Duration::from_secs(120));
        assert_eq!(Chain::Generic.block_interval(), Duration::from_secs(600));
    }

    #[test]
    fn datadir_layout() {
        let home = Path::new("/home/alice");
        assert_eq!(Chain::Bitcoin.default_datadir(home), Some(PathBuf::from("/home/alice/.bitcoin")));
        assert_eq!(Chain::Litecoin.default_datadir(home), Some(PathBuf::from("/home/alice/.litecoin")));
        assert_eq!(Chain::Monero.default_datadir(home), Some(PathBuf::from("/home/alice/.bitmonero")));
        assert_eq!(Chain::Generic.default_datadir(home), None);

        assert_eq!(Chain::Bitcoin.network_subdir(Network::Main), "");
        assert_eq!(Chain::Bitcoin.network_subdir(Network::Test), "testnet3");
        assert_eq!(Chain::Bitcoin.network_subdir(Network::Signet), "signet");
        assert_eq!(Chain::Bitcoin.network_subdir(Network::Regtest), "regtest");
        assert_eq!(Chain::Litecoin.network_subdir(Network::Main), "");
        assert_eq!(Chain::Litecoin.network_subdir(Network::Test), "testnet4");
        assert_eq!(Chain::Litecoin.network_subdir(Network::Signet), "signet");
        assert_eq!(Chain::Litecoin.network_subdir(Network::Regtest), "regtest");
        assert_eq!(Chain::Monero.network_subdir(Network::Main), "");
        assert_eq!(Chain::Monero.network_subdir(Network::Test), "testnet");
        assert_eq!(Chain::Monero.network_subdir(Network::Stagenet), "stagenet");
        assert_eq!(Chain::Monero.network_subdir(Network::Regtest), "");
        for net in ALL_NETWORKS {
            assert_eq!(Chain::Generic.network_subdir(net), "");
        }
    }
}
