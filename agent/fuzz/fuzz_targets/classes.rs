//! The disk file-class rules: `Pattern::parse` on arbitrary text, and a
//! `Classifier` built from arbitrary rules classifying arbitrary paths.
//! Input lines: rule patterns up to an empty line, then paths to classify
//! (`/`-separated). Nothing may panic, a parsed pattern never matches
//! everything, and a file is always given some class.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nodescope::chain::Chain;
use nodescope::config::ClassRule;
use nodescope::disk::classes::{Classifier, Pattern};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (rules, paths) = text.split_once("\n\n").unwrap_or((&text, ""));
    let patterns: Vec<String> = rules.lines().map(str::to_string).collect();
    for p in &patterns {
        let _ = Pattern::parse(p);
    }
    let chains = [None, Some(Chain::Bitcoin), Some(Chain::Litecoin), Some(Chain::Monero)];
    let configured: Vec<ClassRule> = patterns
        .chunks(2)
        .enumerate()
        .map(|(i, paths)| ClassRule {
            class: format!("c{i}"),
            paths: paths.to_vec(),
            chain: chains[i % chains.len()],
            target: (i % 3 == 0).then(|| "t".to_string()),
        })
        .collect();
    let classifier = Classifier::new(&configured);
    for path in paths.lines().take(64) {
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for chain in [Chain::Bitcoin, Chain::Litecoin, Chain::Monero] {
            let class = classifier.classify("t", chain, &parts);
            assert!(!class.is_empty());
        }
    }
});
