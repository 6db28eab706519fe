//! Tests of the `all_users.csv` reader. Every case that reads a CSV file and checks what came of it is data: a pair
//! `cases/NAME.csv` (the input, byte for byte) and `cases/NAME.json` (what the case asserts), checked by
//! [`every_case_reads_as_expected`]. The tests here in code are those of private helpers, of the types' own
//! formats, of unusual readers, of a large generated report and of the example reports.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::{Value, json};
use time::macros::datetime;

use super::*;
use crate::model::CloudMember;

const GHES_HEADER: &str = "created_at,id,login,email,role,suspended?,last_logged_ip,repos,ssh_keys,\
                           org_memberships,dormant?,last_active,raw_login,2fa_enabled?";

/// How many cases `cases/` held when the inline tests became data: fewer means some went missing.
const CASES_AT_LEAST: usize = 37;

/// A full GHES row with the given values for the columns tests vary.
fn ghes_row(id: &str, login: &str, email: &str, suspended: &str) -> String {
    format!(
        "2024-01-02 03:04:05 UTC,{id},{login},{email},User,{suspended},10.0.0.1,3,1,2,false,\
         2024-06-01T10:00:00Z,\"\"\"{login}\"\"\",true"
    )
}

fn parse(text: &str) -> ParsedReport {
    read_all_users_csv(text.as_bytes()).unwrap()
}

fn kinds(report: &ParsedReport) -> Vec<(u64, &'static str)> {
    report
        .skipped
        .iter()
        .map(|row| (row.line, row.reason.kind()))
        .collect()
}

/// Every message the report can show a human or a log.
fn all_messages(report: &ParsedReport) -> Vec<String> {
    let mut messages = Vec::new();
    for row in &report.skipped {
        messages.push(row.to_string());
        messages.push(row.reason.to_string());
        messages.push(serde_json::to_string(row).unwrap());
        messages.push(format!("{row:?}"));
    }
    for warning in &report.warnings {
        messages.push(warning.to_string());
        messages.push(serde_json::to_string(warning).unwrap());
        messages.push(format!("{warning:?}"));
    }
    messages
}

fn assert_consistent(report: &ParsedReport) {
    assert_eq!(
        report.rows_read,
        report.users.len() as u64 + report.rows_skipped(),
        "rows_read must equal kept + skipped"
    );
}

/// Runs every case of `cases/` and names each one that fails, with where and how.
#[test]
fn every_case_reads_as_expected() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/all_users_csv/cases");
    let mut inputs = BTreeSet::new();
    let mut expectations = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        match path.extension().and_then(|extension| extension.to_str()) {
            Some("csv") => inputs.insert(stem),
            Some("json") => expectations.insert(stem),
            _ => continue,
        };
    }
    assert_eq!(
        inputs, expectations,
        "every case needs both NAME.csv and NAME.json"
    );
    assert!(
        inputs.len() >= CASES_AT_LEAST,
        "{} cases in {}",
        inputs.len(),
        dir.display()
    );
    let failures: Vec<String> = inputs
        .iter()
        .filter_map(|name| {
            check_case(&dir, name)
                .err()
                .map(|why| format!("{name}: {why}"))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        inputs.len(),
        failures.join("\n")
    );
}

/// Reads `NAME.csv` and compares the outcome with `NAME.json`; also checks, for every case, what holds for any
/// input: the counts add up and no message shows an email address.
fn check_case(dir: &Path, name: &str) -> Result<(), String> {
    let input = std::fs::read(dir.join(format!("{name}.csv"))).unwrap();
    let expected: Value =
        serde_json::from_slice(&std::fs::read(dir.join(format!("{name}.json"))).unwrap())
            .map_err(|error| format!("{name}.json is not JSON: {error}"))?;
    let Value::Object(mut expected) = expected else {
        return Err(format!("{name}.json is not an object"));
    };
    expected.remove("about");
    let (actual, messages) = match read_all_users_csv(&input[..]) {
        Ok(report) => {
            if report.rows_read != report.users.len() as u64 + report.rows_skipped()
                || report.source_report().rows_skipped != report.rows_skipped()
            {
                return Err(format!("rows_read must equal kept + skipped: {report:?}"));
            }
            let messages = all_messages(&report);
            (report_outcome(&report), messages)
        }
        Err(error) => {
            let messages = vec![error.to_string(), format!("{error:?}")];
            (json!({ "error": error_outcome(&error) }), messages)
        }
    };
    if expected.contains_key("error") != actual.get("error").is_some() {
        return Err(format!(
            "expected {}, got {actual:#}",
            if expected.contains_key("error") {
                "an error"
            } else {
                "a report"
            }
        ));
    }
    if let Some(leak) = messages
        .iter()
        .find(|message| message.contains('@') || message.contains("example.com"))
    {
        return Err(format!("a message leaks an email: {leak}"));
    }
    match mismatch("", &Value::Object(expected), &actual) {
        None => Ok(()),
        Some(why) => Err(why),
    }
}

fn report_outcome(report: &ParsedReport) -> Value {
    json!({
        "rows_read": report.rows_read,
        "users": report.users,
        "skipped": report.skipped,
        "warnings": report.warnings,
    })
}

fn error_outcome(error: &ReportError) -> Value {
    let mut outcome = match error {
        ReportError::Empty => json!({ "kind": "empty" }),
        ReportError::MissingColumns { missing, found } => {
            json!({ "kind": "missing_columns", "missing": missing, "found": found })
        }
        ReportError::DuplicateColumn {
            column,
            first,
            second,
        } => {
            json!({ "kind": "duplicate_column", "column": column, "first": first, "second": second })
        }
        ReportError::Read { line, source } => {
            json!({ "kind": "read", "line": line, "io": source.kind().to_string() })
        }
    };
    outcome["message"] = Value::String(error.to_string());
    outcome
}

/// Where `actual` differs from what `expected` asserts: an object asserts only the keys it names, an array its
/// length and each element, any other value equality.
fn mismatch(path: &str, expected: &Value, actual: &Value) -> Option<String> {
    match (expected, actual) {
        (Value::Object(expected), Value::Object(actual)) => {
            expected.iter().find_map(|(key, expected)| {
                let path = format!("{path}.{key}");
                match actual.get(key) {
                    Some(actual) => mismatch(&path, expected, actual),
                    None => Some(format!("{path}: missing, expected {expected}")),
                }
            })
        }
        (Value::Array(expected), Value::Array(actual)) if expected.len() == actual.len() => {
            expected
                .iter()
                .zip(actual)
                .enumerate()
                .find_map(|(index, (expected, actual))| {
                    mismatch(&format!("{path}[{index}]"), expected, actual)
                })
        }
        _ if expected == actual => None,
        _ => Some(format!("{path}: expected {expected}, got {actual}")),
    }
}

#[test]
fn parse_bool_rejects_other_words() {
    for word in ["", "maybe", "2", "-1", "tru", "yess", "on", "off", "null"] {
        assert_eq!(parse_bool(word.as_bytes()), None, "{word:?}");
    }
}

#[test]
fn timestamps_in_every_accepted_spelling() {
    let cases = [
        ("2024-01-02T03:04:05Z", datetime!(2024-01-02 03:04:05 UTC)),
        (
            "2024-01-02T03:04:05.123Z",
            datetime!(2024-01-02 03:04:05.123 UTC),
        ),
        (
            "2024-01-02T03:04:05+09:00",
            datetime!(2024-01-02 03:04:05 +09:00),
        ),
        (
            "2024-01-02T03:04:05.5-08:00",
            datetime!(2024-01-02 03:04:05.5 -08:00),
        ),
        (
            "2024-01-02 03:04:05 UTC",
            datetime!(2024-01-02 03:04:05 UTC),
        ),
        (
            "2024-01-02 03:04:05 utc",
            datetime!(2024-01-02 03:04:05 UTC),
        ),
        (
            "2024-01-02 03:04:05 +0900",
            datetime!(2024-01-02 03:04:05 +09:00),
        ),
        (
            "2024-01-02 03:04:05 -08:00",
            datetime!(2024-01-02 03:04:05 -08:00),
        ),
        (
            "2024-01-02 03:04:05.250 -0800",
            datetime!(2024-01-02 03:04:05.25 -08:00),
        ),
        ("2024-01-02 03:04:05Z", datetime!(2024-01-02 03:04:05 UTC)),
        ("2024-01-02", datetime!(2024-01-02 00:00:00 UTC)),
        ("  2024-01-02  ", datetime!(2024-01-02 00:00:00 UTC)),
    ];
    for (text, expected) in cases {
        assert_eq!(parse_timestamp(text.as_bytes()), Some(expected), "{text:?}");
    }
    for text in [
        "",
        "yesterday",
        "2024-01-02 03:04:05",
        "2024-02-30",
        "2024-01-02 25:00:00 UTC",
        "02/01/2024",
        "2024-01-02 03:04:05 CEST",
        "2024-01-02é03:04:05 UTC",
        "1704164645",
    ] {
        assert_eq!(parse_timestamp(text.as_bytes()), None, "{text:?}");
    }
}

#[test]
fn skip_reasons_serialise_as_kind_and_message() {
    let row = SkippedRow {
        line: 7,
        reason: SkipReason::InvalidBoolean {
            column: "suspended?",
            value: CellValue::from_raw("maybe"),
        },
    };
    assert_eq!(
        serde_json::to_value(&row).unwrap(),
        serde_json::json!({
            "line": 7,
            "reason": {
                "kind": "invalid_boolean",
                "message": "column `suspended?` is \"maybe\", expected true/false, yes/no or 1/0; without it \
                            the account cannot be counted"
            }
        })
    );
    let warning = RowWarning {
        line: 3,
        column: "last_active",
        message: "m".into(),
    };
    assert_eq!(
        serde_json::to_value(&warning).unwrap(),
        serde_json::json!({"line": 3, "column": "last_active", "message": "m"})
    );
}

#[test]
fn kinds_are_bounded_snake_case_labels() {
    let reasons = [
        SkipReason::WrongFieldCount {
            expected: 1,
            found: 2,
        },
        SkipReason::InvalidUtf8 { column: "login" },
        SkipReason::InvalidId {
            value: CellValue::Empty,
        },
        SkipReason::MissingLogin,
        SkipReason::InvalidBoolean {
            column: "suspended?",
            value: CellValue::Empty,
        },
        SkipReason::DuplicateId {
            id: 1,
            first_line: 2,
        },
        SkipReason::Unreadable,
    ];
    let kinds: Vec<_> = reasons.iter().map(SkipReason::kind).collect();
    assert_eq!(kinds, SkipReason::KINDS);
    for kind in kinds {
        assert!(
            kind.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "{kind}"
        );
    }
}

#[test]
fn io_errors_abort_with_the_line() {
    /// Serves some bytes, then fails like a dropped connection.
    struct Failing(&'static [u8]);
    impl Read for Failing {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "connection reset",
                ));
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let err = read_all_users_csv(Failing(
        b"id,login,email,suspended?\n1,a,a@example.com,no\n2,b",
    ))
    .unwrap_err();
    let ReportError::Read { source, .. } = &err else {
        panic!("unexpected error {err:?}");
    };
    assert_eq!(source.kind(), io::ErrorKind::ConnectionReset);
    assert!(
        err.to_string()
            .starts_with("could not read the report near line"),
        "{err}"
    );
}

#[test]
fn reads_from_a_reader_that_returns_one_byte_at_a_time() {
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let Some((first, rest)) = self.0.split_first() else {
                return Ok(0);
            };
            buf[0] = *first;
            self.0 = rest;
            Ok(1)
        }
    }
    let text = "\u{feff}id,login,email,suspended?\n1,a,a@example.com,no\n";
    let report = read_all_users_csv(Trickle(text.as_bytes())).unwrap();
    assert_eq!(report.users.len(), 1);
    // Shorter than a BOM.
    assert!(matches!(
        read_all_users_csv(Trickle(b"i")),
        Err(ReportError::MissingColumns { .. })
    ));
}

#[test]
fn parses_100k_rows_in_one_pass() {
    let mut text = String::with_capacity(20_000_000);
    text.push_str(GHES_HEADER);
    text.push('\n');
    for id in 1..=100_000 {
        text.push_str(&ghes_row(
            &id.to_string(),
            &format!("user{id}"),
            &format!("user{id}@example.com"),
            "false",
        ));
        text.push('\n');
    }
    let report = parse(&text);
    assert_eq!(report.users.len(), 100_000);
    assert_eq!(report.users[99_999].login, "user100000");
    assert!(report.skipped.is_empty() && report.warnings.is_empty());
}

#[test]
fn the_example_reports_parse_as_documented() {
    let one = parse(include_str!("../../../../examples/ghes-1.all_users.csv"));
    let two = parse(include_str!("../../../../examples/ghes-2.all_users.csv"));
    let three = parse(include_str!("../../../../examples/ghes-3.all_users.csv"));
    for report in [&one, &two, &three] {
        assert_consistent(report);
        assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    }
    assert_eq!(kinds(&one), vec![(12, "invalid_boolean")]);
    assert!(two.skipped.is_empty() && three.skipped.is_empty());
    assert_eq!(
        (one.users.len(), two.users.len(), three.users.len()),
        (12, 10, 8)
    );

    let find = |report: &ParsedReport, login: &str| {
        report
            .users
            .iter()
            .find(|user| user.login == login)
            .cloned()
            .unwrap()
    };
    assert_eq!(find(&one, "ghes-admin").role, UserRole::SiteAdmin);
    assert_eq!(find(&one, "ghost").email, "");
    assert_eq!(find(&one, "build-bot").email, "no-email-here");
    assert!(find(&one, "former-contractor").suspended);
    assert!(find(&one, "old-timer").dormant);
    assert_eq!(find(&one, "mona").email, "Mona.Lisa@Example.com");
    assert_eq!(find(&two, "mona").email, "mona.lisa@example.com");
    assert_ne!(find(&one, "jdoe").email, find(&two, "jdoe").email);
    assert_eq!(find(&three, "mona").email, "MONA.LISA@example.com");
    assert_eq!(find(&three, "priya").email, "Priya.Patel@Example.org");
    assert_eq!(find(&three, "ghes3-admin").role, UserRole::SiteAdmin);
    assert_eq!(
        find(&three, "dave").created_at,
        Some(datetime!(2022-03-15 12:00:00 UTC))
    );
    let admins = [&one, &two, &three]
        .iter()
        .flat_map(|report| &report.users)
        .filter(|user| user.role == UserRole::SiteAdmin)
        .count();
    assert_eq!(admins, 3);

    let members: Vec<CloudMember> =
        serde_json::from_str(include_str!("../../../../examples/cloud-members.json")).unwrap();
    assert_eq!(members.len(), 8);
    assert_eq!(
        members
            .iter()
            .filter(|member| !member.consumes_license)
            .count(),
        1
    );
    let sharing_alice = members
        .iter()
        .filter(|member| {
            member
                .verified_emails
                .iter()
                .any(|email| email == "alice@example.com")
        })
        .count();
    assert_eq!(sharing_alice, 2);
    let octocat = members
        .iter()
        .find(|member| member.login == "octocat")
        .unwrap();
    assert!(
        !octocat
            .verified_emails
            .contains(&"octocat@example.com".to_owned())
    );
    assert!(
        octocat
            .identity
            .as_ref()
            .unwrap()
            .emails
            .contains(&"octocat@example.com".to_owned())
    );
}
