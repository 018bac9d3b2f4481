//! Reading the agent's `/metrics` (Prometheus text format 0.0.4): the
//! samples, sums over label subsets, and quantiles from histogram buckets.

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Every sample of an exposition; lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => (&line[..i], &line[i..]),
        None => return None,
    };
    let mut labels = Vec::new();
    let rest = if let Some(mut r) = rest.strip_prefix('{') {
        loop {
            r = r.trim_start_matches([',', ' ']);
            if let Some(after) = r.strip_prefix('}') {
                break after;
            }
            let eq = r.find('=')?;
            let key = r[..eq].trim().to_string();
            r = r[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = r.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.push((key, value));
            r = &r[end + 1..];
        }
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name: name.to_string(), labels, value })
}

/// The samples named `name` whose labels include every pair of `with`.
pub fn select<'a>(
    samples: &'a [Sample],
    name: &'a str,
    with: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = &'a Sample> + 'a {
    samples.iter().filter(move |s| s.name == name && with.iter().all(|(k, v)| s.label(k) == Some(*v)))
}

/// Sum of the matching samples; None when there is none.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> Option<f64> {
    select(samples, name, with).map(|s| s.value).fold(None, |acc, v| Some(acc.unwrap_or(0.0) + v))
}

/// Cumulative bucket counts by upper bound (`le`), summed over the other labels, ascending.
pub fn buckets(samples: &[Sample], bucket_name: &str, with: &[(&str, &str)]) -> Vec<(f64, f64)> {
    let mut out: Vec<(f64, f64)> = Vec::new();
    for s in select(samples, bucket_name, with) {
        let Some(le) = s.label("le").and_then(|l| if l == "+Inf" { Some(f64::INFINITY) } else { l.parse().ok() })
        else {
            continue;
        };
        match out.iter_mut().find(|(b, _)| *b == le) {
            Some((_, c)) => *c += s.value,
            None => out.push((le, s.value)),
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `later - earlier`, bucket by bucket (for the observations in between).
pub fn bucket_delta(later: &[(f64, f64)], earlier: &[(f64, f64)]) -> Vec<(f64, f64)> {
    later
        .iter()
        .map(|(le, c)| {
            let before = earlier.iter().find(|(b, _)| b == le).map_or(0.0, |(_, c)| *c);
            (*le, (c - before).max(0.0))
        })
        .collect()
}

/// The q-quantile of cumulative buckets, interpolated within its bucket as
/// Prometheus' histogram_quantile does; in the +Inf bucket, the highest
/// finite bound. None without observations.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, c) in buckets {
        if c >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = c - prev.1;
            let frac = if in_bucket > 0.0 { (rank - prev.1) / in_bucket } else { 1.0 };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, c);
    }
    Some(prev.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP nodescope_connection_opened_total Connections established
# TYPE nodescope_connection_opened_total counter
nodescope_connection_opened_total{nodescope_connection_direction="inbound",nodescope_service="p2p",nodescope_target="ltc"} 3
nodescope_connection_opened_total{nodescope_connection_direction="outbound",nodescope_service="p2p",nodescope_target="ltc"} 2
nodescope_connection_opened_total{nodescope_connection_direction="inbound",nodescope_service="rpc",nodescope_target="a \"b\""} 7
nodescope_file_sync_duration_seconds_bucket{nodescope_file_class="blocks",nodescope_target="ltc",le="0.001"} 5
nodescope_file_sync_duration_seconds_bucket{nodescope_file_class="blocks",nodescope_target="ltc",le="0.002"} 9
nodescope_file_sync_duration_seconds_bucket{nodescope_file_class="blocks",nodescope_target="ltc",le="+Inf"} 10
nodescope_file_sync_duration_seconds_bucket{nodescope_file_class="log",nodescope_target="ltc",le="0.001"} 0
nodescope_file_sync_duration_seconds_bucket{nodescope_file_class="log",nodescope_target="ltc",le="0.002"} 0
nodescope_file_sync_duration_seconds_bucket{nodescope_file_class="log",nodescope_target="ltc",le="+Inf"} 10
nodescope_datadir_days_until_full{nodescope_target="ltc"} 12.5 1700000000000
"#;

    #[test]
    fn top_parses_the_exposition() {
        let s = parse(TEXT);
        assert_eq!(s.len(), 10);
        assert_eq!(s[2].label("nodescope_target"), Some("a \"b\""));
        assert_eq!(sum(&s, "nodescope_connection_opened_total", &[("nodescope_target", "ltc")]), Some(5.0));
        assert_eq!(sum(&s, "nodescope_connection_opened_total", &[("nodescope_target", "x")]), None);
        assert_eq!(sum(&s, "nodescope_datadir_days_until_full", &[]), Some(12.5));
    }

    #[test]
    fn top_quantiles_from_buckets() {
        let s = parse(TEXT);
        let b = buckets(&s, "nodescope_file_sync_duration_seconds_bucket", &[("nodescope_file_class", "blocks")]);
        assert_eq!(b, vec![(0.001, 5.0), (0.002, 9.0), (f64::INFINITY, 10.0)]);
        assert_eq!(quantile(&b, 0.5), Some(0.001));
        assert!((quantile(&b, 0.7).unwrap() - 0.0015).abs() < 1e-12);
        // past the last finite bound: that bound
        assert_eq!(quantile(&b, 0.99), Some(0.002));
        let all = buckets(&s, "nodescope_file_sync_duration_seconds_bucket", &[]);
        assert_eq!(all.last(), Some(&(f64::INFINITY, 20.0)));
        let d = bucket_delta(&b, &[(0.001, 5.0), (0.002, 5.0), (f64::INFINITY, 5.0)]);
        assert_eq!(d, vec![(0.001, 0.0), (0.002, 4.0), (f64::INFINITY, 5.0)]);
        assert_eq!(quantile(&[(1.0, 0.0), (f64::INFINITY, 0.0)], 0.5), None);
    }
}
