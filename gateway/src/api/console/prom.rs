//! Reads our own `/metrics` text back: the console shows the very counters Prometheus scrapes,
//! so a figure on the overview and the same series in Grafana can never disagree.

/// One sample of the text exposition format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, name: &str) -> &str {
        self.labels
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }
}

/// Samples whose metric name starts with one of `prefixes` (others are skipped unparsed).
pub fn parse(text: &str, prefixes: &[&str]) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && prefixes.iter().any(|p| l.starts_with(p)))
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices();
        loop {
            // label name up to '=', then a quoted value with \" \\ \n escapes
            let (start, c) = chars.next()?;
            if c == '}' {
                rest = &body[start + 1..];
                break;
            }
            if c == ',' || c == ' ' {
                continue;
            }
            let eq = body[start..].find('=')? + start;
            let key = body[start..eq].to_string();
            while chars.next()?.0 < eq + 1 {}
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// A histogram's cumulative buckets `(le, count)`, ascending, plus its sum and count.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Histogram {
    pub buckets: Vec<(f64, f64)>,
    pub sum: f64,
    pub count: f64,
}

impl Histogram {
    pub fn from_samples(samples: &[Sample], name: &str) -> Histogram {
        let mut h = Histogram::default();
        for s in samples {
            match s.name.strip_prefix(name) {
                Some("_bucket") => {
                    let le = match s.label("le") {
                        "+Inf" => f64::INFINITY,
                        le => le.parse().unwrap_or(f64::INFINITY),
                    };
                    h.buckets.push((le, s.value));
                }
                Some("_sum") => h.sum += s.value,
                Some("_count") => h.count += s.value,
                _ => {}
            }
        }
        h.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        h
    }

    /// What was observed since `earlier` (counters only grow; a restart resets both).
    pub fn since(&self, earlier: &Histogram) -> Histogram {
        if earlier.count > self.count || earlier.buckets.len() != self.buckets.len() {
            return self.clone();
        }
        Histogram {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(a, b)| (a.0, a.1 - b.1))
                .collect(),
            sum: self.sum - earlier.sum,
            count: self.count - earlier.count,
        }
    }

    /// The upper bound of the bucket holding quantile `q` (Prometheus' histogram_quantile
    /// without interpolation: an upper estimate); None without observations.
    pub fn quantile_upper(&self, q: f64) -> Option<f64> {
        if self.count <= 0.0 {
            return None;
        }
        let rank = q * self.count;
        self.buckets
            .iter()
            .find(|(_, c)| *c >= rank)
            .map(|(le, _)| *le)
    }

    pub fn mean(&self) -> Option<f64> {
        (self.count > 0.0).then(|| self.sum / self.count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP citygw_messages_rejected_total Messages refused
# TYPE citygw_messages_rejected_total counter
citygw_messages_rejected_total{protocol="mqtt",reason="malformed_json"} 3
citygw_messages_rejected_total{protocol="coap",reason="a \"quoted\", odd\\one"} 1
citygw_readings_stored_total 42
citygw_store_commit_seconds_bucket{le="0.001"} 2
citygw_store_commit_seconds_bucket{le="0.01"} 9
citygw_store_commit_seconds_bucket{le="+Inf"} 10
citygw_store_commit_seconds_sum 0.05
citygw_store_commit_seconds_count 10
other_metric 1
"#;

    #[test]
    fn samples_labels_and_escapes() {
        let s = parse(TEXT, &["citygw_messages_rejected", "citygw_readings"]); // not a metric
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].label("reason"), "malformed_json");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].label("reason"), "a \"quoted\", odd\\one");
        assert_eq!(s[1].label("protocol"), "coap");
        assert_eq!(
            (s[2].name.as_str(), s[2].value),
            ("citygw_readings_stored_total", 42.0)
        );
        assert!(parse("citygw_x{broken", &["citygw"]).is_empty());
    }

    #[test]
    fn histogram_quantiles_over_an_interval() {
        let s = parse(TEXT, &["citygw_store_commit_seconds"]);
        let h = Histogram::from_samples(&s, "citygw_store_commit_seconds");
        assert_eq!(h.count, 10.0);
        assert_eq!(h.quantile_upper(0.5), Some(0.01));
        assert_eq!(h.quantile_upper(0.1), Some(0.001));
        assert_eq!(h.quantile_upper(1.0), Some(f64::INFINITY));
        assert_eq!(h.mean(), Some(0.005));
        let later = Histogram {
            buckets: vec![(0.001, 2.0), (0.01, 9.0), (f64::INFINITY, 12.0)],
            sum: 1.05,
            count: 12.0,
        };
        let d = later.since(&h);
        assert_eq!(d.count, 2.0);
        assert_eq!(d.quantile_upper(0.99), Some(f64::INFINITY));
        assert!(Histogram::default().quantile_upper(0.5).is_none());
    }
}
