//! A validating parser for the Prometheus text exposition format, version 0.0.4, so tests check
//! `/metrics` by its grammar rather than by looking for substrings.

use std::collections::{HashMap, HashSet};

/// One sample line.
#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
    }

    /// The label names, sorted.
    pub fn label_names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.labels.iter().map(|(n, _)| n.as_str()).collect();
        v.sort_unstable();
        v
    }
}

/// A whole exposition, validated: TYPE and HELP per family, and the samples.
#[derive(Debug, Default)]
pub struct Exposition {
    pub types: HashMap<String, String>,
    pub helps: HashMap<String, String>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The samples named `name`.
    pub fn of(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// The value of the series `name` with exactly the labels `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.of(name)
            .into_iter()
            .find(|s| {
                s.labels.len() == labels.len() && labels.iter().all(|(k, v)| s.label(k) == Some(v))
            })
            .map(|s| s.value)
    }
}

fn is_name(s: &str, colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic() || c == '_' || (colon && c == ':') || (!first && c.is_ascii_digit())
    };
    let mut cs = s.chars();
    cs.next().is_some_and(|c| ok(c, true)) && cs.all(|c| ok(c, false))
}

/// A HELP docstring: only `\\` and `\n` escapes.
fn unescape_help(s: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut cs = s.chars();
    while let Some(c) = cs.next() {
        match c {
            '\\' => match cs.next() {
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                other => return Err(format!("bad escape \\{other:?} in HELP")),
            },
            c => out.push(c),
        }
    }
    Ok(out)
}

fn prom_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ if !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) => {
            s.parse().ok()
        }
        _ => None,
    }
}

/// Parses `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ', '\t']).unwrap_or(line.len());
    let name = &line[..end];
    if !is_name(name, true) {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[end..];
    let mut labels: Vec<(String, String)> = Vec::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([' ', '\t']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=').ok_or("label without =")?;
            let lname = rest[..eq].trim_end_matches([' ', '\t']);
            if !is_name(lname, false) || lname.starts_with("__") {
                return Err(format!("bad label name {lname:?}"));
            }
            if labels.iter().any(|(n, _)| n == lname) {
                return Err(format!("label {lname} given twice"));
            }
            rest = rest[eq + 1..].trim_start_matches([' ', '\t']);
            rest = rest.strip_prefix('"').ok_or("label value not quoted")?;
            let mut value = String::new();
            let mut cs = rest.char_indices();
            let close = loop {
                match cs.next() {
                    None => return Err("unterminated label value".into()),
                    Some((i, '"')) => break i,
                    Some((_, '\\')) => match cs.next() {
                        Some((_, '\\')) => value.push('\\'),
                        Some((_, '"')) => value.push('"'),
                        Some((_, 'n')) => value.push('\n'),
                        other => return Err(format!("bad escape in label value: {other:?}")),
                    },
                    Some((_, c)) => value.push(c),
                }
            };
            labels.push((lname.to_string(), value));
            rest = rest[close + 1..].trim_start_matches([' ', '\t']);
            if let Some(r) = rest.strip_prefix(',') {
                rest = r;
            } else if !rest.starts_with('}') {
                return Err("expected , or } after a label".into());
            }
        }
    }
    if !rest.starts_with([' ', '\t']) {
        return Err("no blank before the value".into());
    }
    let mut words = rest.split_whitespace();
    let value = words
        .next()
        .and_then(prom_value)
        .ok_or("bad or missing value")?;
    if let Some(ts) = words.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if words.next().is_some() {
        return Err("trailing text after the timestamp".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The family a sample belongs to: its name, or for histograms and summaries the name without
/// `_bucket` / `_sum` / `_count`.
fn family_of(name: &str, types: &HashMap<String, String>) -> Option<String> {
    if types.contains_key(name) {
        return Some(name.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = name.strip_suffix(suffix)?;
        matches!(types.get(base)?.as_str(), "histogram" | "summary").then(|| base.to_string())
    })
}

/// Parses and validates an exposition: the last line ends with a line feed; every sample's family
/// has a `# TYPE` line before its first sample, at most one TYPE and one HELP per family; a
/// family's samples form one group; label syntax and escaping; numeric values; no series twice.
pub fn parse_prometheus(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix('\n')
        .ok_or("the last line does not end with a line feed")?;
    let mut e = Exposition::default();
    let mut current: Option<String> = None;
    let mut finished: HashSet<String> = HashSet::new();
    let mut series: HashSet<String> = HashSet::new();
    for (no, line) in body.split('\n').enumerate() {
        let at = |m: &str| format!("line {}: {m}: {line:?}", no + 1);
        if line.trim_matches([' ', '\t']).is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment
                .trim_start_matches([' ', '\t'])
                .splitn(3, [' ', '\t']);
            let keyword = words.next().unwrap_or("");
            if keyword != "HELP" && keyword != "TYPE" {
                continue; // a plain comment
            }
            let name = words.next().unwrap_or("");
            let rest = words.next().unwrap_or("");
            if !is_name(name, true) {
                return Err(at("bad metric name"));
            }
            if current.as_deref() == Some(name) || finished.contains(name) {
                return Err(at("HELP or TYPE after the family's samples"));
            }
            if keyword == "HELP" {
                let doc = unescape_help(rest).map_err(|m| at(&m))?;
                if e.helps.insert(name.to_string(), doc).is_some() {
                    return Err(at("a second HELP"));
                }
            } else {
                let kind = rest.trim_matches([' ', '\t']);
                let known = ["counter", "gauge", "histogram", "summary", "untyped"];
                if !known.contains(&kind) {
                    return Err(at("unknown type"));
                }
                if e.types.insert(name.to_string(), kind.to_string()).is_some() {
                    return Err(at("a second TYPE"));
                }
            }
            continue;
        }
        let s = parse_sample(line).map_err(|m| at(&m))?;
        let family = family_of(&s.name, &e.types).ok_or_else(|| at("no # TYPE line before it"))?;
        if current.as_deref() != Some(family.as_str()) {
            if finished.contains(&family) {
                return Err(at("the family's samples are not in one group"));
            }
            if let Some(done) = current.replace(family) {
                finished.insert(done);
            }
        }
        let mut key: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        key.sort_unstable();
        if !series.insert(format!("{}{{{}}}", s.name, key.join(","))) {
            return Err(at("the same series twice"));
        }
        e.samples.push(s);
    }
    Ok(e)
}

#[test]
fn the_prometheus_validator_rejects_malformed_text() {
    let ok = "# HELP a Docs with \\\\ and \\n.\n# TYPE a counter\na{l=\"q\\\"\\\\\\n\",m=\"ü\"} 1.5e3\n\n# TYPE b gauge\nb -Inf 1700000000\n";
    let e = parse_prometheus(ok).unwrap();
    assert_eq!(e.get("a", &[("l", "q\"\\\n"), ("m", "ü")]), Some(1500.0));
    assert_eq!(e.helps["a"], "Docs with \\ and \n.");
    assert_eq!(e.get("b", &[]), Some(f64::NEG_INFINITY));
    for bad in [
        "a 1\n",                                                    // no TYPE
        "# TYPE a gauge\na 1",                                      // no final line feed
        "# TYPE a gauge\na{l=\"x\\q\"} 1\n",                        // bad escape
        "# TYPE a gauge\na{l=\"x} 1\n",                             // unterminated value
        "# TYPE a gauge\na{l=x} 1\n",                               // unquoted value
        "# TYPE a gauge\na{1l=\"x\"} 1\n",                          // bad label name
        "# TYPE a gauge\na{l=\"x\",l=\"y\"} 1\n",                   // label twice
        "# TYPE a gauge\na one\n",                                  // not a number
        "# TYPE a gauge\na\n",                                      // no value
        "# TYPE a gauge\na 1 2 3\n",                                // trailing text
        "# TYPE a gauge\n# TYPE a counter\na 1\n",                  // two TYPEs
        "# TYPE a gauge\na 1\n# TYPE a gauge\n",                    // TYPE after samples
        "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"1\"} 2\n", // not grouped
        "# TYPE a gauge\na 1\na 2\n",                               // same series twice
        "# TYPE a gauge\n# TYPE a-b gauge\n",                       // bad metric name
        "# TYPE a nonsense\na 1\n",                                 // unknown type
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}
