//! Reading a `/metrics` answer (Prometheus text or OpenMetrics) in tests: just enough of the format to find samples
//! by name and labels. The services encode with `prometheus-client`; this only reads.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};

/// One sample line: `name{label="value",…} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of an exposition, in order. Comment lines (`# HELP`, `# TYPE`, `# UNIT`, `# EOF`) are skipped.
pub fn parse(text: &str) -> Result<Vec<Sample>> {
    let mut samples = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        samples.push(parse_line(line).with_context(|| format!("line {}: {line}", number + 1))?);
    }
    Ok(samples)
}

fn parse_line(line: &str) -> Result<Sample> {
    let name_end = line
        .find(['{', ' '])
        .context("a sample needs a value after its name")?;
    let name = line[..name_end].to_owned();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after_brace) = rest.strip_prefix('{') {
        let mut chars = after_brace.char_indices().peekable();
        let mut consumed = None;
        loop {
            // key
            let mut key = String::new();
            for (index, c) in chars.by_ref() {
                match c {
                    '=' => break,
                    '}' if key.is_empty() => {
                        consumed = Some(index + 1);
                        break;
                    }
                    ',' if key.is_empty() => {}
                    _ => key.push(c),
                }
            }
            if consumed.is_some() {
                break;
            }
            match chars.next() {
                Some((_, '"')) => {}
                _ => bail!("label {key} has no quoted value"),
            }
            let mut value = String::new();
            let mut escaped = false;
            let mut closed = false;
            for (_, c) in chars.by_ref() {
                match (escaped, c) {
                    (true, 'n') => {
                        value.push('\n');
                        escaped = false;
                    }
                    (true, other) => {
                        value.push(other);
                        escaped = false;
                    }
                    (false, '\\') => escaped = true,
                    (false, '"') => {
                        closed = true;
                        break;
                    }
                    (false, other) => value.push(other),
                }
            }
            if !closed {
                bail!("label {key}'s value is not closed");
            }
            labels.insert(key.trim().to_owned(), value);
            match chars.next() {
                Some((_, ',')) => {
                    if let Some((index, '}')) = chars.peek().copied() {
                        chars.next();
                        consumed = Some(index + 1);
                        break;
                    }
                }
                Some((index, '}')) => {
                    consumed = Some(index + 1);
                    break;
                }
                _ => bail!("labels are not closed"),
            }
        }
        let consumed = consumed.context("labels are not closed")?;
        rest = &after_brace[consumed..];
    }
    let value = rest
        .split_whitespace()
        .next()
        .context("a sample needs a value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        other => other
            .parse()
            .with_context(|| format!("{other:?} is not a number"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// The samples of one exposition, with look-ups for assertions.
#[derive(Debug, Clone)]
pub struct Exposition {
    pub samples: Vec<Sample>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Self> {
        Ok(Exposition {
            samples: parse(text)?,
        })
    }

    /// The value of the sample named `name` whose labels include `labels` (other labels may be present); `None`
    /// if there is none, and an error if several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        let matching: Vec<&Sample> = self.matching(name, labels).collect();
        match matching.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.value)),
            several => bail!("{} samples of {name} match {labels:?}", several.len()),
        }
    }

    /// Every sample named `name` whose labels include `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |sample| {
            sample.name == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(*key).map(String::as_str) == Some(*value))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_labels_and_values() {
        let text = "# HELP a_total A.\n# TYPE a counter\na_total{x=\"1\",y=\"q\\\"uote\"} 3\n\
                    b 4.5\nc_bucket{le=\"+Inf\"} 2\nd{} 1\n# EOF\n";
        let exposition = Exposition::parse(text).expect("parse");
        assert_eq!(exposition.samples.len(), 4);
        assert_eq!(
            exposition
                .value("a_total", &[("y", "q\"uote")])
                .expect("one"),
            Some(3.0)
        );
        assert_eq!(exposition.value("b", &[]).expect("one"), Some(4.5));
        assert_eq!(
            exposition
                .value("c_bucket", &[("le", "+Inf")])
                .expect("one"),
            Some(2.0)
        );
        assert_eq!(exposition.value("d", &[]).expect("one"), Some(1.0));
        assert_eq!(
            exposition.value("a_total", &[("x", "2")]).expect("none"),
            None
        );
        assert!(parse("broken{x=\"1} 2").is_err());
    }
}
