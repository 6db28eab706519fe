//! Tolerant reader of GHES's `all_users.csv` site-admin report (SPEC §2).
//!
//! [`read_all_users_csv`] takes any [`std::io::Read`] (a file, an HTTP body, a byte slice) and returns the accounts
//! it could use plus a report of every row it could not use. It performs no I/O of its own.
//!
//! # What is tolerated
//!
//! - Columns are matched by name, in any order. Names are compared after trimming whitespace, ignoring ASCII case,
//!   ignoring a trailing `?` and treating spaces and `-` as `_` (`Suspended`, `suspended?` and ` SUSPENDED ? ` are
//!   the same column). Unknown columns are ignored.
//! - A UTF-8 byte-order mark, `\n` or `\r\n` line endings, blank lines (ignored and not counted), quoted fields that
//!   contain newlines.
//! - Booleans spelled `true/false`, `yes/no`, `1/0`, `t/f` or `y/n`, in any case, with surrounding whitespace.
//! - Timestamps in RFC 3339 (`2024-01-02T03:04:05Z`, with an offset or fractional seconds), Ruby's
//!   `2024-01-02 03:04:05 UTC` / `2024-01-02 03:04:05 +0900` / `-09:00`, or a bare date (midnight UTC).
//!
//! # What is required
//!
//! The header must name [`REQUIRED_COLUMNS`] (`id`, `login`, `email`, `suspended?`), otherwise the whole file is
//! refused with [`ReportError::MissingColumns`]. A data row is **skipped** (listed in [`ParsedReport::skipped`],
//! never silently dropped) when it has a different number of fields than the header, when `id` is not a positive
//! integer, when `login` is empty, when `suspended?` is not a boolean, when a required column is not valid UTF-8,
//! or when its `id` already appeared on an earlier kept row. An optional column that cannot be parsed is dropped
//! (`None` / default) and reported as a [`RowWarning`]; the row is kept. The email is kept as trimmed text even
//! when it is not an address: the merge engine decides what an invalid email means.
//!
//! # Privacy
//!
//! No message produced here (skip reasons, warnings, errors) contains the content of the `email` column, and any
//! other cell value quoted in a message is replaced by a placeholder when it contains an `@`, so that an email
//! address in the wrong column cannot leak into logs either.
//!
//! # Line numbers
//!
//! Every line number is the 1-based physical line of the file where the row *starts* (the header is line 1 unless
//! blank lines precede it). They are computed from the reader's position after the record minus the newlines
//! inside its quoted fields, rather than from `csv::Position::line()` of the record, which points at the end of
//! the previous record (wrong after blank lines and with `\r\n` endings).

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Read};

use csv::{ByteRecord, ReaderBuilder, Terminator};
use serde::ser::SerializeStruct as _;
use serde::{Serialize, Serializer};
use time::{Date, Month, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use crate::model::{ServerUser, SourceReport, UserRole};

/// Columns without which the report cannot be used, by their canonical names.
pub const REQUIRED_COLUMNS: [&str; 4] = ["id", "login", "email", "suspended?"];

/// Longest cell value (in characters) quoted in a message; longer values are cut with `…`.
const MAX_QUOTED_CHARS: usize = 40;
/// How many found column names [`ReportError::MissingColumns`] lists before summarising the rest.
const MAX_LISTED_COLUMNS: usize = 20;
const BOOLEAN_SPELLINGS: &str = "true/false, yes/no or 1/0";
const TIMESTAMP_EXPECTED: &str =
    "an ISO 8601 date and time such as 2024-01-02T03:04:05Z or 2024-01-02 03:04:05 UTC";

/// What [`read_all_users_csv`] made of a report.
///
/// Invariant: `rows_read == users.len() + skipped.len()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParsedReport {
    /// The usable accounts, in file order.
    pub users: Vec<ServerUser>,
    /// Data rows seen (kept + skipped); the header and blank lines are not counted.
    pub rows_read: u64,
    /// Every row that was not used, with the reason.
    pub skipped: Vec<SkippedRow>,
    /// Optional values that were dropped on kept rows (and duplicated optional columns in the header).
    pub warnings: Vec<RowWarning>,
}

impl ParsedReport {
    pub fn rows_skipped(&self) -> u64 {
        self.skipped.len() as u64
    }

    /// The counts a snapshot carries about its source.
    pub fn source_report(&self) -> SourceReport {
        SourceReport {
            rows_read: self.rows_read,
            rows_skipped: self.rows_skipped(),
        }
    }
}

/// A data row that was not used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRow {
    /// 1-based physical line where the row starts (the header is line 1).
    pub line: u64,
    pub reason: SkipReason,
}

impl fmt::Display for SkippedRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.reason)
    }
}

/// A cell value as it may appear in a message: never an email address, never unbounded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CellValue {
    /// The cell was empty (or only whitespace).
    Empty,
    /// The trimmed value, cut to a few dozen characters.
    Text(String),
    /// The value contained an `@` and is not shown.
    Redacted,
}

impl CellValue {
    /// Makes a raw cell value safe to show. Values containing `@` are withheld.
    pub fn from_raw(raw: &str) -> Self {
        let value = raw.trim();
        if value.is_empty() {
            CellValue::Empty
        } else if value.contains('@') {
            CellValue::Redacted
        } else {
            match value.char_indices().nth(MAX_QUOTED_CHARS) {
                Some((cut, _)) => CellValue::Text(format!("{}…", &value[..cut])),
                None => CellValue::Text(value.to_owned()),
            }
        }
    }
}

impl fmt::Display for CellValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CellValue::Empty => f.write_str("empty"),
            CellValue::Text(text) => write!(f, "{text:?}"),
            CellValue::Redacted => {
                f.write_str("a value that looks like an email address (not shown)")
            }
        }
    }
}

/// Why a row was skipped.
///
/// Serialises as `{"kind": "<kind()>", "message": "<Display>"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SkipReason {
    /// The row does not have as many fields as the header.
    WrongFieldCount { expected: usize, found: usize },
    /// A required column is not valid UTF-8.
    InvalidUtf8 { column: &'static str },
    /// `id` is empty, not an integer, or not positive.
    InvalidId { value: CellValue },
    /// `login` is empty.
    MissingLogin,
    /// A required boolean column (`suspended?`) is empty or not a recognised spelling.
    InvalidBoolean {
        column: &'static str,
        value: CellValue,
    },
    /// An earlier kept row has the same `id`.
    DuplicateId { id: i64, first_line: u64 },
    /// The CSV reader could not decode the row.
    Unreadable,
}

impl SkipReason {
    /// Every value [`SkipReason::kind`] can return, e.g. to initialise a labelled counter.
    pub const KINDS: [&'static str; 7] = [
        "wrong_field_count",
        "invalid_utf8",
        "invalid_id",
        "missing_login",
        "invalid_boolean",
        "duplicate_id",
        "unreadable_row",
    ];

    /// A short, bounded, snake_case label (usable as a Prometheus label value).
    pub fn kind(&self) -> &'static str {
        match self {
            SkipReason::WrongFieldCount { .. } => "wrong_field_count",
            SkipReason::InvalidUtf8 { .. } => "invalid_utf8",
            SkipReason::InvalidId { .. } => "invalid_id",
            SkipReason::MissingLogin => "missing_login",
            SkipReason::InvalidBoolean { .. } => "invalid_boolean",
            SkipReason::DuplicateId { .. } => "duplicate_id",
            SkipReason::Unreadable => "unreadable_row",
        }
    }
}

impl fmt::Display for SkipReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SkipReason::WrongFieldCount { expected, found } => write!(
                f,
                "the row has {found} fields but the header has {expected}; an unquoted comma, an unbalanced quote \
                 or a cut-off line is the usual cause, so fix the row or export the report again"
            ),
            SkipReason::InvalidUtf8 { column } => write!(
                f,
                "column `{column}` is not valid UTF-8 text; export the report again as UTF-8"
            ),
            SkipReason::InvalidId { value } => write!(
                f,
                "column `id` is {value}, expected a positive whole number (the account's id on the instance)"
            ),
            SkipReason::MissingLogin => {
                f.write_str("column `login` is empty; every account needs a login")
            }
            SkipReason::InvalidBoolean { column, value } => write!(
                f,
                "column `{column}` is {value}, expected {BOOLEAN_SPELLINGS}; without it the account cannot be \
                 counted"
            ),
            SkipReason::DuplicateId { id, first_line } => write!(
                f,
                "id {id} already appeared on line {first_line}, which is kept; ids are unique on an instance, so \
                 remove or fix the duplicate row"
            ),
            SkipReason::Unreadable => {
                f.write_str("the row could not be decoded as CSV; fix or remove it")
            }
        }
    }
}

impl Serialize for SkipReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut state = serializer.serialize_struct("SkipReason", 2)?;
        state.serialize_field("kind", self.kind())?;
        state.serialize_field("message", &self.to_string())?;
        state.end()
    }
}

/// An optional value that could not be used on a kept row; the value is dropped (`None` or its default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RowWarning {
    /// 1-based physical line where the row starts (1 for warnings about the header).
    pub line: u64,
    /// Canonical column name, e.g. `last_active` or `dormant?`.
    pub column: &'static str,
    /// What was wrong and what was done about it; never contains an email address.
    pub message: String,
}

impl fmt::Display for RowWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

/// Why a report could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "the report is empty: no header row was found; expected GHES's all_users.csv, whose first line names the \
         columns (created_at, id, login, email, role, suspended?, ...)"
    )]
    Empty,
    #[error(
        "the report lacks required column(s) {}; columns found: {}. Expected GHES's all_users.csv \
         (/stafftools/reports/all_users.csv), which has at least `id`, `login`, `email` and `suspended?`",
        list_columns(missing.iter().copied()),
        list_found_columns(found)
    )]
    MissingColumns {
        /// Canonical names of the required columns that were not found.
        missing: Vec<&'static str>,
        /// The header's column names, trimmed; names containing `@` are replaced by a placeholder.
        found: Vec<String>,
    },
    #[error(
        "required column `{column}` appears more than once in the header (columns {first} and {second}), so the \
         report is ambiguous; export it again from GHES"
    )]
    DuplicateColumn {
        column: &'static str,
        /// 1-based column positions.
        first: usize,
        second: usize,
    },
    #[error("could not read the report near line {line}: {source}")]
    Read {
        line: u64,
        #[source]
        source: io::Error,
    },
}

fn list_columns<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn list_found_columns(found: &[String]) -> String {
    if found.is_empty() {
        return "(none)".to_owned();
    }
    let mut listed = list_columns(found.iter().take(MAX_LISTED_COLUMNS).map(String::as_str));
    if found.len() > MAX_LISTED_COLUMNS {
        listed.push_str(&format!(" and {} more", found.len() - MAX_LISTED_COLUMNS));
    }
    listed
}

/// The columns this reader uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Col {
    CreatedAt,
    Id,
    Login,
    Email,
    Role,
    Suspended,
    Dormant,
    LastActive,
    TwoFactor,
}

impl Col {
    const ALL: [Col; 9] = [
        Col::CreatedAt,
        Col::Id,
        Col::Login,
        Col::Email,
        Col::Role,
        Col::Suspended,
        Col::Dormant,
        Col::LastActive,
        Col::TwoFactor,
    ];

    /// The name as GHES documents it.
    fn name(self) -> &'static str {
        match self {
            Col::CreatedAt => "created_at",
            Col::Id => "id",
            Col::Login => "login",
            Col::Email => "email",
            Col::Role => "role",
            Col::Suspended => "suspended?",
            Col::Dormant => "dormant?",
            Col::LastActive => "last_active",
            Col::TwoFactor => "2fa_enabled?",
        }
    }

    fn required(self) -> bool {
        matches!(self, Col::Id | Col::Login | Col::Email | Col::Suspended)
    }

    fn from_header(header: &str) -> Option<Col> {
        let key = normalize_header(header);
        Col::ALL
            .into_iter()
            .find(|col| normalize_header(col.name()) == key)
    }
}

/// Header comparison key: trimmed, ASCII lower case, without a trailing `?`, spaces and `-` as `_`.
fn normalize_header(header: &str) -> String {
    let trimmed = header.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
    let trimmed = trimmed.strip_suffix('?').unwrap_or(trimmed).trim_end();
    trimmed
        .chars()
        .map(|c| match c {
            ' ' | '-' => '_',
            other => other.to_ascii_lowercase(),
        })
        .collect()
}

/// Where each used column sits in a row, computed once from the header.
#[derive(Debug)]
struct Layout {
    width: usize,
    id: usize,
    login: usize,
    email: usize,
    suspended: usize,
    role: Option<usize>,
    dormant: Option<usize>,
    two_factor: Option<usize>,
    created_at: Option<usize>,
    last_active: Option<usize>,
}

impl Layout {
    fn from_header(
        header: &ByteRecord,
        line: u64,
        warnings: &mut Vec<RowWarning>,
    ) -> Result<Self, ReportError> {
        let mut slots: [Option<usize>; Col::ALL.len()] = [None; Col::ALL.len()];
        for (index, raw) in header.iter().enumerate() {
            let name = String::from_utf8_lossy(raw);
            let Some(col) = Col::from_header(&name) else {
                continue;
            };
            let slot = &mut slots[col as usize];
            match *slot {
                None => *slot = Some(index),
                Some(first) if col.required() => {
                    return Err(ReportError::DuplicateColumn {
                        column: col.name(),
                        first: first + 1,
                        second: index + 1,
                    });
                }
                Some(first) => warnings.push(RowWarning {
                    line,
                    column: col.name(),
                    message: format!(
                        "column `{}` appears more than once in the header (columns {} and {}); the first one is used",
                        col.name(),
                        first + 1,
                        index + 1
                    ),
                }),
            }
        }
        let slot = |col: Col| slots[col as usize];
        match (
            slot(Col::Id),
            slot(Col::Login),
            slot(Col::Email),
            slot(Col::Suspended),
        ) {
            (Some(id), Some(login), Some(email), Some(suspended)) => Ok(Layout {
                width: header.len(),
                id,
                login,
                email,
                suspended,
                role: slot(Col::Role),
                dormant: slot(Col::Dormant),
                two_factor: slot(Col::TwoFactor),
                created_at: slot(Col::CreatedAt),
                last_active: slot(Col::LastActive),
            }),
            _ => Err(ReportError::MissingColumns {
                missing: Col::ALL
                    .into_iter()
                    .filter(|col| col.required() && slot(*col).is_none())
                    .map(Col::name)
                    .collect(),
                found: header
                    .iter()
                    .map(|raw| {
                        let name = String::from_utf8_lossy(raw);
                        let name =
                            name.trim_matches(|c: char| c.is_whitespace() || c == '\u{feff}');
                        match CellValue::from_raw(name) {
                            CellValue::Empty => String::new(),
                            CellValue::Text(text) => text,
                            CellValue::Redacted => {
                                "(a name that looks like an email address, not shown)".to_owned()
                            }
                        }
                    })
                    .collect(),
            }),
        }
    }
}

/// Reads GHES's `all_users.csv` report. See the [module documentation](self) for the rules.
///
/// Whole-file problems (no header, missing required columns, an I/O error) are a [`ReportError`]; a bad row never
/// is: it is skipped and listed in [`ParsedReport::skipped`].
pub fn read_all_users_csv<R: Read>(reader: R) -> Result<ParsedReport, ReportError> {
    let mut reader = reader;
    let prefix =
        read_past_bom(&mut reader).map_err(|source| ReportError::Read { line: 1, source })?;
    // A final newline makes every record end with `\n`, which the line arithmetic in `next_record` relies on;
    // it only adds a blank line, which the CSV reader skips.
    let input = io::Cursor::new(prefix).chain(reader).chain(&b"\n"[..]);
    let mut csv = ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        // Only `\n` ends a record: a `\r` before it stays in the last field, where trimming removes it.
        .terminator(Terminator::Any(b'\n'))
        .buffer_capacity(64 * 1024)
        .from_reader(input);
    let mut record = ByteRecord::new();
    let mut report = ParsedReport::default();

    let layout = loop {
        match next_record(&mut csv, &mut record)? {
            Next::End => return Err(ReportError::Empty),
            Next::Record(_) if is_blank(&record) => continue,
            Next::Record(line) | Next::Unreadable(line) => {
                break Layout::from_header(&record, line, &mut report.warnings)?;
            }
        }
    };

    let mut first_line_of_id = IdMap::default();
    loop {
        let line = match next_record(&mut csv, &mut record)? {
            Next::End => break,
            Next::Unreadable(line) => {
                report.rows_read += 1;
                report.skipped.push(SkippedRow {
                    line,
                    reason: SkipReason::Unreadable,
                });
                continue;
            }
            Next::Record(_) if is_blank(&record) => continue,
            Next::Record(line) => line,
        };
        report.rows_read += 1;
        match parse_row(
            &layout,
            &record,
            line,
            &mut first_line_of_id,
            &mut report.warnings,
        ) {
            Ok(user) => report.users.push(user),
            Err(reason) => report.skipped.push(SkippedRow { line, reason }),
        }
    }
    Ok(report)
}

/// Reads the first bytes and returns them, minus a UTF-8 byte-order mark if there is one.
fn read_past_bom<R: Read>(reader: &mut R) -> io::Result<Vec<u8>> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    let mut buf = [0u8; 3];
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(err),
        }
    }
    if &buf[..filled] == BOM {
        Ok(Vec::new())
    } else {
        Ok(buf[..filled].to_vec())
    }
}

enum Next {
    /// A record starting at this line.
    Record(u64),
    /// The CSV reader could not decode a record near this line; it has moved past it.
    Unreadable(u64),
    End,
}

fn next_record<R: Read>(
    csv: &mut csv::Reader<R>,
    record: &mut ByteRecord,
) -> Result<Next, ReportError> {
    match csv.read_byte_record(record) {
        Ok(false) => Ok(Next::End),
        Ok(true) => {
            // The reader is now just past the record's final `\n`; step back over it and over the newlines
            // inside quoted fields to reach the line the record starts on.
            let embedded: u64 = record
                .as_slice()
                .iter()
                .map(|&byte| u64::from(byte == b'\n'))
                .sum();
            let line = csv.position().line().saturating_sub(1 + embedded).max(1);
            Ok(Next::Record(line))
        }
        Err(err) if err.is_io_error() => {
            let line = csv.position().line();
            let source = match err.into_kind() {
                csv::ErrorKind::Io(source) => source,
                _ => io::Error::other("the input could not be read"),
            };
            Err(ReportError::Read { line, source })
        }
        // Not expected with byte records and a flexible reader, but never fatal for the file.
        Err(_) => Ok(Next::Unreadable(
            csv.position().line().saturating_sub(1).max(1),
        )),
    }
}

/// A line with nothing but whitespace (a `\r`, spaces) in a single field.
fn is_blank(record: &ByteRecord) -> bool {
    record.len() == 1
        && record
            .iter()
            .all(|field| field.iter().all(u8::is_ascii_whitespace))
}

fn cell(record: &ByteRecord, index: usize) -> Result<&str, std::str::Utf8Error> {
    std::str::from_utf8(record.get(index).unwrap_or_default()).map(str::trim)
}

fn required_cell(record: &ByteRecord, index: usize, col: Col) -> Result<&str, SkipReason> {
    cell(record, index).map_err(|_| SkipReason::InvalidUtf8 { column: col.name() })
}

fn parse_row(
    layout: &Layout,
    record: &ByteRecord,
    line: u64,
    first_line_of_id: &mut IdMap,
    warnings: &mut Vec<RowWarning>,
) -> Result<ServerUser, SkipReason> {
    if record.len() != layout.width {
        return Err(SkipReason::WrongFieldCount {
            expected: layout.width,
            found: record.len(),
        });
    }

    let id_text = required_cell(record, layout.id, Col::Id)?;
    let id = match id_text.parse::<i64>() {
        Ok(id) if id > 0 => id,
        _ => {
            return Err(SkipReason::InvalidId {
                value: CellValue::from_raw(id_text),
            });
        }
    };
    let login = required_cell(record, layout.login, Col::Login)?;
    if login.is_empty() {
        return Err(SkipReason::MissingLogin);
    }
    let email = required_cell(record, layout.email, Col::Email)?;
    let suspended_text = required_cell(record, layout.suspended, Col::Suspended)?;
    let Some(suspended) = parse_bool(suspended_text.as_bytes()) else {
        return Err(SkipReason::InvalidBoolean {
            column: Col::Suspended.name(),
            value: CellValue::from_raw(suspended_text),
        });
    };
    match first_line_of_id.entry(id) {
        Entry::Occupied(first) => {
            return Err(SkipReason::DuplicateId {
                id,
                first_line: *first.get(),
            });
        }
        Entry::Vacant(slot) => {
            slot.insert(line);
        }
    }

    // From here on the row is kept; optional values that cannot be used become warnings.
    let mut optional = Optional {
        record,
        line,
        warnings,
    };
    let role = optional.role(layout.role);
    let dormant = optional
        .boolean(
            layout.dormant,
            Col::Dormant,
            "the account is taken as not dormant",
        )
        .unwrap_or(false);
    let two_factor_enabled = optional.boolean(
        layout.two_factor,
        Col::TwoFactor,
        "two-factor status is left unknown",
    );
    let created_at = optional.timestamp(layout.created_at, Col::CreatedAt);
    let last_active = optional.timestamp(layout.last_active, Col::LastActive);

    Ok(ServerUser {
        id,
        login: login.to_owned(),
        email: email.to_owned(),
        role,
        suspended,
        dormant,
        created_at,
        last_active,
        two_factor_enabled,
    })
}

/// Reads optional columns of one kept row, reporting unusable values.
struct Optional<'a> {
    record: &'a ByteRecord,
    line: u64,
    warnings: &'a mut Vec<RowWarning>,
}

impl<'a> Optional<'a> {
    /// Parses an optional column. The fast path parses the ASCII-trimmed bytes (no UTF-8 check, no allocation);
    /// only a value that fails is checked for UTF-8 and retried with Unicode trimming, and if it still fails it
    /// is reported and dropped. An absent column or an empty value is `None` without a warning.
    fn parse<T>(
        &mut self,
        index: Option<usize>,
        col: Col,
        parse: impl Fn(&[u8]) -> Option<T>,
        expected: &str,
        consequence: &str,
    ) -> Option<T> {
        let raw = self.record.get(index?)?.trim_ascii();
        if raw.is_empty() {
            return None;
        }
        if let Some(value) = parse(raw) {
            return Some(value);
        }
        let message = match std::str::from_utf8(raw) {
            Ok(text) => {
                let text = text.trim();
                if text.is_empty() {
                    return None;
                }
                if let Some(value) = parse(text.as_bytes()) {
                    return Some(value);
                }
                format!(
                    "column `{}` is {}, expected {expected}; {consequence}",
                    col.name(),
                    CellValue::from_raw(text)
                )
            }
            Err(_) => format!(
                "column `{}` is not valid UTF-8 text; {consequence}",
                col.name()
            ),
        };
        self.warnings.push(RowWarning {
            line: self.line,
            column: col.name(),
            message,
        });
        None
    }

    fn role(&mut self, index: Option<usize>) -> UserRole {
        let role = |raw: &[u8]| {
            if contains_admin(raw) {
                Some(UserRole::SiteAdmin)
            } else {
                std::str::from_utf8(raw).ok().map(|_| UserRole::User)
            }
        };
        self.parse(
            index,
            Col::Role,
            role,
            "a role",
            "the account is taken as a normal user",
        )
        .unwrap_or_default()
    }

    fn boolean(&mut self, index: Option<usize>, col: Col, consequence: &str) -> Option<bool> {
        self.parse(index, col, parse_bool, BOOLEAN_SPELLINGS, consequence)
    }

    fn timestamp(&mut self, index: Option<usize>, col: Col) -> Option<OffsetDateTime> {
        self.parse(
            index,
            col,
            parse_timestamp,
            TIMESTAMP_EXPECTED,
            "the value is ignored",
        )
    }
}

/// `true/false`, `yes/no`, `1/0`, `t/f`, `y/n`, any ASCII case, surrounding whitespace ignored.
fn parse_bool(text: &[u8]) -> Option<bool> {
    let text = text.trim_ascii();
    let is = |word: &[u8]| text.eq_ignore_ascii_case(word);
    match text.len() {
        1 => match text[0].to_ascii_lowercase() {
            b'1' | b't' | b'y' => Some(true),
            b'0' | b'f' | b'n' => Some(false),
            _ => None,
        },
        2 if is(b"no") => Some(false),
        3 if is(b"yes") => Some(true),
        4 if is(b"true") => Some(true),
        5 if is(b"false") => Some(false),
        _ => None,
    }
}

/// `Site admin`, `site_admin`, `ADMIN`, ... (any ASCII case).
fn contains_admin(text: &[u8]) -> bool {
    text.windows(5)
        .any(|window| window.eq_ignore_ascii_case(b"admin"))
}

/// Parses the timestamp spellings described in the module documentation:
/// `YYYY-MM-DD`, or `YYYY-MM-DD` + (`T` | space) + `HH:MM:SS` + optional `.fraction` + optional spaces + zone,
/// where the zone is `Z`, `UTC`, `GMT`, `+HH:MM` or `+HHMM` (any sign, any case). This covers RFC 3339 and
/// Ruby's `Time#to_s`. A missing zone is not guessed. Hand-written because it runs twice per row.
fn parse_timestamp(text: &[u8]) -> Option<OffsetDateTime> {
    let bytes = text.trim_ascii();
    let date = parse_date(bytes.get(..10)?)?;
    if bytes.len() == 10 {
        return Some(date.midnight().assume_utc());
    }
    if !matches!(bytes[10], b' ' | b'T' | b't')
        || bytes.get(13) != Some(&b':')
        || bytes.get(16) != Some(&b':')
    {
        return None;
    }
    let hour = two_digits(bytes, 11)?;
    let minute = two_digits(bytes, 14)?;
    let second = two_digits(bytes, 17)?;
    let mut end = 19;
    let mut nanos = 0u32;
    if bytes.get(end) == Some(&b'.') {
        end += 1;
        let mut digits = 0u32;
        while let Some(digit) = bytes.get(end).filter(|byte| byte.is_ascii_digit()) {
            if digits < 9 {
                nanos = nanos * 10 + u32::from(digit - b'0');
                digits += 1;
            }
            end += 1;
        }
        if digits == 0 {
            return None;
        }
        nanos *= 10u32.pow(9 - digits);
    }
    let time = Time::from_hms_nano(hour, minute, second, nanos).ok()?;
    let offset = parse_zone(bytes[end..].trim_ascii_start())?;
    Some(PrimitiveDateTime::new(date, time).assume_offset(offset))
}

/// `YYYY-MM-DD`.
fn parse_date(bytes: &[u8]) -> Option<Date> {
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return None;
    }
    let year = i32::from(two_digits(bytes, 0)?) * 100 + i32::from(two_digits(bytes, 2)?);
    let month = Month::try_from(two_digits(bytes, 5)?).ok()?;
    Date::from_calendar_date(year, month, two_digits(bytes, 8)?).ok()
}

/// `Z`, `UTC`, `GMT`, `+HH:MM`, `+HHMM` (and `-`).
fn parse_zone(zone: &[u8]) -> Option<UtcOffset> {
    if [&b"z"[..], b"utc", b"gmt"]
        .iter()
        .any(|name| zone.eq_ignore_ascii_case(name))
    {
        return Some(UtcOffset::UTC);
    }
    let sign: i8 = match zone.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let minute_at = match zone.len() {
        6 if zone[3] == b':' => 4,
        5 => 3,
        _ => return None,
    };
    let hours = i8::try_from(two_digits(zone, 1)?).ok()?;
    let minutes = i8::try_from(two_digits(zone, minute_at)?).ok()?;
    UtcOffset::from_hms(sign * hours, sign * minutes, 0).ok()
}

/// The two ASCII digits at `at`, as a number.
fn two_digits(bytes: &[u8], at: usize) -> Option<u8> {
    match bytes.get(at..at + 2)? {
        [tens @ b'0'..=b'9', units @ b'0'..=b'9'] => Some((tens - b'0') * 10 + (units - b'0')),
        _ => None,
    }
}

/// A cheap hasher for the duplicate-id check (Fibonacci hashing of the id). The ids come from the instance's
/// own report, so resistance to crafted collisions is not needed, and SipHash showed up in profiles.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*byte)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_i64(&mut self, value: i64) {
        self.0 = (self.0.rotate_left(5) ^ value as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdMap = HashMap<i64, u64, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
