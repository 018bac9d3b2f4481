//! File classes: which part of a node's data a file belongs to (its block
//! files, its UTXO database, its log...), decided from the end of the file's
//! path.
//!
//! A pattern is a `/`-separated list of components matched against the LAST
//! components of the path: `blocks/blk*.dat` matches
//! `/srv/ltc/regtest/blocks/blk00000.dat`, wherever the data dir is (the
//! kernel reports paths relative to the file's filesystem root, and only
//! their last few components). In a component `*` matches any run of
//! characters and `?` one character; a whole component `**` matches any
//! number of components, so `chainstate/**` matches everything under a
//! `chainstate` directory, and the directory itself.
//!
//! Rules are tried in order and the first match wins: `[[disk.classes]]`
//! rules from the config first, then the chain's built-in rules, then
//! `other`.

use crate::chain::Chain;
use crate::config::{ClassRule, Config, ConfigError};

pub const OTHER: &str = "other";

/// Built-in rules of Bitcoin Core and its forks (Litecoin Core), in order.
/// Temp files count with the file they replace: the node writes
/// `mempool.dat.new` and `peers.dat.<random>` and renames them.
const BITCOIN_RULES: &[(&str, &[&str])] = &[
    ("block_index", &["blocks/index/**"]),
    ("blocks", &["blocks/blk*.dat", "blocks/rev*.dat"]),
    ("chainstate", &["chainstate/**"]),
    ("indexes", &["indexes/**"]),
    ("mempool", &["mempool.dat*"]),
    ("peers", &["peers.dat*", "anchors.dat*"]),
    ("wallet", &["wallets/**", "wallet.dat*"]),
    ("log", &["debug.log"]),
];

/// monerod: LMDB (data.mdb, lock.mdb under lmdb/) and its log.
const MONERO_RULES: &[(&str, &[&str])] = &[("lmdb", &["lmdb/**"]), ("log", &["bitmonero.log*"])];

pub fn builtin_rules(chain: Chain) -> &'static [(&'static str, &'static [&'static str])] {
    match chain {
        Chain::Bitcoin | Chain::Litecoin => BITCOIN_RULES,
        Chain::Monero => MONERO_RULES,
        Chain::Generic => &[],
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    /// `**`: zero or more components
    AnyDepth,
    Glob(String),
}

/// Every pattern of the config's `[[disk.classes]]` parses (the part of
/// config checking only the classifier can do).
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    for (i, rule) in config.disk.classes.iter().enumerate() {
        for (j, p) in rule.paths.iter().enumerate() {
            if let Err(why) = Pattern::parse(p) {
                return Err(ConfigError::invalid(format!("disk.classes[{i}].paths[{j}]"), why));
            }
        }
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    parts: Vec<Part>,
}

impl Pattern {
    /// Err says what is wrong, for the config error.
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("empty pattern".into());
        }
        if text.starts_with('/') {
            return Err(format!("{text:?}: patterns match the end of a path and must not start with '/'"));
        }
        let mut parts = Vec::new();
        for comp in text.split('/') {
            match comp {
                "" => return Err(format!("{text:?}: empty path component")),
                "." | ".." => return Err(format!("{text:?}: '.' and '..' never appear in the paths matched")),
                "**" => parts.push(Part::AnyDepth),
                c if c.contains("**") => return Err(format!("{text:?}: '**' must be a whole component")),
                c => parts.push(Part::Glob(c.to_string())),
            }
        }
        if parts.iter().all(|p| *p == Part::AnyDepth) {
            return Err(format!("{text:?}: matches every file; name at least one component"));
        }
        Ok(Pattern { parts })
    }

    /// Whether the pattern matches the end of `path` (components, root side first).
    pub fn matches<S: AsRef<str>>(&self, path: &[S]) -> bool {
        (0..=path.len()).any(|start| match_parts(&self.parts, &path[start..]))
    }
}

fn match_parts<S: AsRef<str>>(parts: &[Part], path: &[S]) -> bool {
    match parts.split_first() {
        None => path.is_empty(),
        Some((Part::AnyDepth, rest)) => (0..=path.len()).any(|skip| match_parts(rest, &path[skip..])),
        Some((Part::Glob(g), rest)) => match path.split_first() {
            Some((first, tail)) => glob(g.as_bytes(), first.as_ref().as_bytes()) && match_parts(rest, tail),
            None => false,
        },
    }
}

/// `*` and `?` within one component.
fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| glob(rest, &name[skip..])),
        Some((b'?', rest)) => !name.is_empty() && glob(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && glob(rest, &name[1..]),
    }
}

#[derive(Debug, Clone)]
struct Rule {
    class: String,
    patterns: Vec<Pattern>,
    chain: Option<Chain>,
    target: Option<String>,
}

impl Rule {
    fn applies(&self, target: &str, chain: Chain) -> bool {
        self.chain.is_none_or(|c| c == chain) && self.target.as_deref().is_none_or(|t| t == target)
    }
}

#[derive(Debug, Clone, Default)]
pub struct Classifier {
    configured: Vec<Rule>,
    builtin: Vec<Rule>,
}

impl Classifier {
    /// The config's rules were validated when it was loaded; a pattern that
    /// fails to parse here is skipped.
    pub fn new(configured: &[ClassRule]) -> Classifier {
        let configured = configured
            .iter()
            .map(|r| Rule {
                class: r.class.clone(),
                patterns: r.paths.iter().filter_map(|p| Pattern::parse(p).ok()).collect(),
                chain: r.chain,
                target: r.target.clone(),
            })
            .collect();
        let builtin = [Chain::Bitcoin, Chain::Litecoin, Chain::Monero]
            .into_iter()
            .flat_map(|chain| {
                builtin_rules(chain).iter().map(move |(class, pats)| Rule {
                    class: class.to_string(),
                    patterns: pats.iter().map(|p| Pattern::parse(p).expect("built-in patterns parse")).collect(),
                    chain: Some(chain),
                    target: None,
                })
            })
            .collect();
        Classifier { configured, builtin }
    }

    /// The class of a file of `target` (running `chain`) at `path`.
    pub fn classify<S: AsRef<str>>(&self, target: &str, chain: Chain, path: &[S]) -> &str {
        self.configured
            .iter()
            .chain(self.builtin.iter())
            .find(|r| r.applies(target, chain) && r.patterns.iter().any(|p| p.matches(path)))
            .map_or(OTHER, |r| r.class.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(p: &str) -> Vec<&str> {
        p.split('/').filter(|c| !c.is_empty()).collect()
    }

    fn class(c: &Classifier, chain: Chain, path: &str) -> String {
        c.classify("t", chain, &split(path)).to_string()
    }

    #[test]
    fn litecoin_layout() {
        let c = Classifier::new(&[]);
        let l = Chain::Litecoin;
        assert_eq!(class(&c, l, "/d/regtest/blocks/blk00000.dat"), "blocks");
        assert_eq!(class(&c, l, "/d/regtest/blocks/rev00012.dat"), "blocks");
        assert_eq!(class(&c, l, "/d/regtest/blocks/index/000005.ldb"), "block_index");
        assert_eq!(class(&c, l, "/d/regtest/blocks/index/MANIFEST-000002"), "block_index");
        assert_eq!(class(&c, l, "/d/regtest/blocks/xor.dat"), "other");
        assert_eq!(class(&c, l, "/d/chainstate/000003.log"), "chainstate");
        assert_eq!(class(&c, l, "/d/chainstate"), "chainstate");
        assert_eq!(class(&c, l, "/d/indexes/blockfilter/basic/db/000001.ldb"), "indexes");
        assert_eq!(class(&c, l, "/d/mempool.dat.new"), "mempool");
        assert_eq!(class(&c, l, "/d/peers.dat.3f2a"), "peers");
        assert_eq!(class(&c, l, "/d/anchors.dat"), "peers");
        assert_eq!(class(&c, l, "/d/wallets/w/wallet.dat"), "wallet");
        assert_eq!(class(&c, l, "/d/wallets/database/log.0000000001"), "wallet");
        assert_eq!(class(&c, l, "/d/wallet.dat"), "wallet");
        assert_eq!(class(&c, l, "/d/debug.log"), "log");
        assert_eq!(class(&c, l, "/d/settings.json"), "other");
        assert_eq!(class(&c, l, "/d/fee_estimates.dat"), "other");
        // monero's names mean nothing to a litecoin node
        assert_eq!(class(&c, l, "/d/lmdb/data.mdb"), "other");
    }

    #[test]
    fn monero_layout() {
        let c = Classifier::new(&[]);
        let m = Chain::Monero;
        assert_eq!(class(&c, m, "/d/fake/lmdb/data.mdb"), "lmdb");
        assert_eq!(class(&c, m, "/d/lmdb/lock.mdb"), "lmdb");
        assert_eq!(class(&c, m, "/d/bitmonero.log"), "log");
        assert_eq!(class(&c, m, "/d/bitmonero.log-2024-01-01-00-00-00"), "log");
        assert_eq!(class(&c, m, "/d/p2pstate.bin"), "other");
        assert_eq!(class(&c, Chain::Generic, "/d/debug.log"), "other");
    }

    #[test]
    fn configured_rules_come_first_and_filter() {
        let rules = vec![
            ClassRule { class: "snapshots".into(), paths: vec!["**/snap/*.dat".into()], chain: None, target: None },
            ClassRule {
                class: "mylog".into(),
                paths: vec!["debug.log".into()],
                chain: Some(Chain::Bitcoin),
                target: None,
            },
            ClassRule {
                class: "special".into(),
                paths: vec!["blocks/**".into()],
                chain: None,
                target: Some("other-node".into()),
            },
        ];
        let c = Classifier::new(&rules);
        assert_eq!(class(&c, Chain::Litecoin, "/x/snap/a.dat"), "snapshots");
        assert_eq!(class(&c, Chain::Bitcoin, "/x/debug.log"), "mylog");
        assert_eq!(class(&c, Chain::Litecoin, "/x/debug.log"), "log");
        assert_eq!(class(&c, Chain::Litecoin, "/x/blocks/blk1.dat"), "blocks");
        assert_eq!(c.classify("other-node", Chain::Litecoin, &split("/x/blocks/blk1.dat")), "special");
    }

    #[test]
    fn patterns() {
        let p = |s: &str| Pattern::parse(s).unwrap();
        assert!(p("a/*.ldb").matches(&split("/x/a/1.ldb")));
        assert!(!p("a/*.ldb").matches(&split("/x/a/b/1.ldb")));
        assert!(p("a/**/*.ldb").matches(&split("/x/a/b/c/1.ldb")));
        assert!(p("a/**/*.ldb").matches(&split("/a/1.ldb")));
        assert!(p("blk?????.dat").matches(&split("blk00001.dat")));
        assert!(!p("blk?????.dat").matches(&split("blk0001.dat")));
        assert!(p("a/**").matches(&split("/a")));
        assert!(!p("a/**").matches(&split("/ab/c")));
        for bad in ["", "/abs", "a//b", "**", "**/**", "a/**b", "../x", "a/./b"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
