//! `--console-pages`: the owner's web console timed page by page over real HTTP against the aggregator the run
//! started, after its syncs, next to a baseline timed the same way in the same run (the REST `consumed-licenses`
//! page 1 of 100). Each page is requested `--console-requests` times in a row by one client; the first request is
//! reported apart as "cold" (it may build a per-generation cache: the people search's haystack, the likely
//! duplicates), the others give p50, p99 and max. Every answer must be 200 and hold the page's contract element (the
//! `id` the console's tests assert), and lists that must find someone must show a row, so that a broken or empty
//! page is refused rather than timed as fast.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use license_sync_aggregator::console::SESSION_COOKIE;
use reqwest::StatusCode;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};

use crate::{histogram, micros, ms};

/// The console's people list shows this many a page (`console::pages::PEOPLE_PER_PAGE`).
const PEOPLE_PER_PAGE: usize = 50;
/// The budget issue 12 sets for every console page at 1M accounts.
const PAGE_BUDGET: Duration = Duration::from_millis(200);

/// One page to time: what it is called in the table, its path under the HTTP address, and what its answer must hold.
struct PageRequest {
    name: String,
    path: String,
    /// The contract element, e.g. `id="people"`.
    marker: &'static str,
    /// A list that must show at least one person (`data-person-id=` in a row).
    needs_rows: bool,
}

/// What one page measured.
struct PageTiming {
    name: String,
    cold: Duration,
    warm: Histogram<u64>,
    /// `#people-total` of a people page: how many the search or filter selected.
    matching: Option<u64>,
    bytes: usize,
    /// Held to issue 12's 200 ms: every console page, not the baseline nor the CSV's end (which grows with the
    /// enterprise by design: every person).
    budgeted: bool,
}

/// `Cookie` value of the session the sign-in opened (`name=value` of its `Set-Cookie`).
async fn sign_in(client: &reqwest::Client, http_url: &str, token: &str) -> Result<String> {
    let response = client
        .post(format!("{http_url}/console/sign-in"))
        .form(&[("token", token)])
        .send()
        .await
        .context("posting the console sign-in")?;
    if response.status() != StatusCode::SEE_OTHER {
        bail!(
            "the console sign-in answered {} instead of a 303 to the overview: is the loadgen token refused?",
            response.status()
        );
    }
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let cookie = response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .filter_map(|value| value.split(';').next())
        .find(|pair| pair.starts_with(&format!("{SESSION_COOKIE}=")))
        .map(str::to_owned)
        .with_context(|| format!("the console sign-in set no `{SESSION_COOKIE}` cookie"))?;
    if !location.starts_with("/console/") {
        bail!("the console sign-in redirected to {location:?}, not to a console page");
    }
    Ok(cookie)
}

/// The number in `<span id="people-total">N</span>`, if the page has one.
fn people_total(body: &str) -> Option<u64> {
    let rest = &body[body.find("id=\"people-total\"")?..];
    let digits = &rest[rest.find('>')? + 1..];
    let end = digits
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// GETs `url` and reads the whole body; refuses anything but a 200 holding `marker` (and a row if asked).
async fn fetch_checked(
    request: reqwest::RequestBuilder,
    page: &PageRequest,
) -> Result<(Duration, String)> {
    let started = Instant::now();
    let response = request
        .send()
        .await
        .with_context(|| format!("requesting {}", page.name))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .with_context(|| format!("reading {}", page.name))?;
    let elapsed = started.elapsed();
    if status != StatusCode::OK {
        let shown: String = body.chars().take(300).collect();
        bail!("{} answered {status}, not 200: {shown}", page.name);
    }
    if !body.contains(page.marker) {
        bail!(
            "{} answered 200 without its contract element `{}`",
            page.name,
            page.marker
        );
    }
    if page.needs_rows && !body.contains("data-person-id=") {
        bail!(
            "{} shows nobody, but its query selects someone: not timed",
            page.name
        );
    }
    Ok((elapsed, body))
}

/// Times `page` `requests` times; `build` makes each request (with its cookie or token).
async fn time_page(
    page: PageRequest,
    requests: usize,
    build: impl Fn(&str) -> reqwest::RequestBuilder,
) -> Result<PageTiming> {
    let mut warm = histogram();
    let mut cold = Duration::ZERO;
    let mut matching = None;
    let mut bytes = 0;
    for n in 0..requests {
        let (elapsed, body) = fetch_checked(build(&page.path), &page).await?;
        if n == 0 {
            cold = elapsed;
            matching = people_total(&body);
            bytes = body.len();
        } else {
            warm.record(micros(elapsed))?;
        }
    }
    Ok(PageTiming {
        name: page.name,
        cold,
        warm,
        matching,
        bytes,
        budgeted: true,
    })
}

/// The CSV download: time to the first body chunk and to the end, each request; checks one row per consuming person.
async fn time_csv(
    client: &reqwest::Client,
    url: &str,
    cookie: &str,
    requests: usize,
    consumed: u64,
) -> Result<(PageTiming, PageTiming)> {
    let (mut first_byte, mut to_end) = (histogram(), histogram());
    let (mut cold_first, mut cold_end) = (Duration::ZERO, Duration::ZERO);
    let mut bytes = 0;
    for n in 0..requests {
        let started = Instant::now();
        let mut response = client.get(url).header(COOKIE, cookie).send().await?;
        if response.status() != StatusCode::OK {
            bail!(
                "the console's CSV download answered {}, not 200",
                response.status()
            );
        }
        let mut first = None;
        let (mut lines, mut size) = (0u64, 0usize);
        let mut header_seen = false;
        while let Some(chunk) = response.chunk().await? {
            if first.is_none() {
                first = Some(started.elapsed());
                header_seen = chunk.starts_with(b"GitHub com login,");
            }
            lines += chunk.iter().filter(|&&byte| byte == b'\n').count() as u64;
            size += chunk.len();
        }
        let end = started.elapsed();
        let first = first.context("the console's CSV download was empty")?;
        if !header_seen {
            bail!(
                "the console's CSV download does not start with GitHub's header (`GitHub com login,…`)"
            );
        }
        // The synthetic data has no line break inside a cell: one line per person after the header.
        if lines != consumed + 1 {
            bail!(
                "the console's CSV download has {} rows for {consumed} consuming people",
                lines.saturating_sub(1)
            );
        }
        if n == 0 {
            (cold_first, cold_end, bytes) = (first, end, size);
        } else {
            first_byte.record(micros(first))?;
            to_end.record(micros(end))?;
        }
    }
    let timing = |name: &str, cold, warm, budgeted| PageTiming {
        name: name.to_owned(),
        cold,
        warm,
        matching: None,
        bytes,
        budgeted,
    };
    Ok((
        timing("CSV download, first byte", cold_first, first_byte, true),
        timing("CSV download, to the end", cold_end, to_end, false),
    ))
}

/// Someone to look at, from REST pages of the middle, the start and the end: ids for the explanation and the comparison, and
/// search terms.
struct Subjects {
    person_a: String,
    person_b: String,
    login: String,
    host_id: String,
}

/// Pages of `consumed-licenses` read at most to find the subjects (where cloud people sort depends on the data).
const SUBJECT_PAGES: u64 = 50;

async fn subjects(
    http: &reqwest::Client,
    consumed_url: &str,
    token: &str,
    consumed: u64,
) -> Result<Subjects> {
    let pages = consumed.div_ceil(100).max(1);
    let text = |user: &serde_json::Value, key: &str| user[key].as_str().unwrap_or("").to_owned();
    let (mut cloud, mut server, mut other): (
        Option<serde_json::Value>,
        Option<String>,
        Option<String>,
    ) = (None, None, None);
    for n in 0..SUBJECT_PAGES.min(pages) {
        // From the middle, the start and the end in turn: cloud members may sort together at either end.
        let page_number = match n % 3 {
            0 => (pages / 2 + n / 3).min(pages - 1) + 1,
            1 => n / 3 + 1,
            _ => pages - n / 3,
        };
        let page: serde_json::Value = http
            .get(format!("{consumed_url}?per_page=100&page={page_number}"))
            .bearer_auth(token)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let users = page["users"]
            .as_array()
            .context("consumed-licenses answered without `users`")?;
        for user in users {
            if cloud.is_none() && !text(user, "github_com_login").is_empty() {
                cloud = Some(user.clone());
            } else if other.is_none() {
                other = Some(text(user, "person_id"));
            }
            if server.is_none()
                && let Some(id) = user["enterprise_server_user_ids"][0].as_str()
            {
                server = Some(id.to_owned());
            }
        }
        if cloud.is_some() && server.is_some() && other.is_some() {
            break;
        }
    }
    let (Some(cloud), Some(host_id), Some(person_b)) = (cloud, server, other) else {
        bail!(
            "no person with a cloud account, one with a GHES account and a third in {SUBJECT_PAGES} pages of \
             consumed-licenses: give --cloud-members and --users-per-instance"
        );
    };
    Ok(Subjects {
        person_a: text(&cloud, "person_id"),
        person_b,
        login: text(&cloud, "github_com_login"),
        host_id,
    })
}

/// Signs in to the console of the aggregator at `http_url` with `token` and times every page (module docs); returns
/// the table to print.
pub async fn run(
    http_url: &str,
    enterprise: &str,
    token: &str,
    requests: usize,
    consumed: u64,
) -> Result<String> {
    // No redirects, so that the sign-in's 303 and its cookie are seen; one connection reused, as a browser tab.
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let consumed_url = format!("{http_url}/enterprises/{enterprise}/consumed-licenses");
    let subjects = subjects(&client, &consumed_url, token, consumed).await?;
    let cookie = sign_in(&client, http_url, token).await?;
    let console = |rest: &str| format!("/console/{enterprise}/{rest}");
    let query = |pairs: &[(&str, &str)]| {
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs)
            .finish()
    };
    let middle_page = (consumed as usize)
        .div_ceil(PEOPLE_PER_PAGE)
        .div_ceil(2)
        .max(1);
    let people = |name: &str, rest: String, needs_rows: bool| PageRequest {
        name: name.to_owned(),
        path: console(&rest),
        marker: "id=\"people\"",
        needs_rows,
    };
    // The first search builds the view generation's haystack: its cold figure includes that.
    let pages = vec![
        PageRequest {
            name: "overview".to_owned(),
            path: console(""),
            marker: "id=\"consumed\"",
            needs_rows: false,
        },
        PageRequest {
            name: "instances".to_owned(),
            path: console("instances"),
            marker: "id=\"instances\"",
            needs_rows: false,
        },
        people("people, page 1", "people".to_owned(), true),
        people(
            &format!("people, page {middle_page} (middle)"),
            format!("people?page={middle_page}"),
            true,
        ),
        people(
            "people, search by login",
            format!("people?{}", query(&[("q", &subjects.login)])),
            true,
        ),
        people(
            "people, search by email domain",
            format!("people?{}", query(&[("q", "corp.example")])),
            true,
        ),
        people(
            "people, search by host:id",
            format!("people?{}", query(&[("q", &subjects.host_id)])),
            true,
        ),
        people("people, filter both", "people?filter=both".to_owned(), true),
        people(
            "people, filter ambiguous",
            "people?filter=ambiguous".to_owned(),
            false,
        ),
        PageRequest {
            name: "one person's explanation".to_owned(),
            path: console(&format!("people/{}", segment(&subjects.person_a))),
            marker: "id=\"explanation\"",
            needs_rows: false,
        },
        PageRequest {
            name: "comparison of two people".to_owned(),
            path: console(&format!(
                "compare?{}",
                query(&[("a", &subjects.person_a), ("b", &subjects.person_b)])
            )),
            marker: "id=\"comparison\"",
            needs_rows: false,
        },
        PageRequest {
            name: "likely duplicates".to_owned(),
            path: console("duplicates"),
            marker: "id=\"duplicates\"",
            needs_rows: false,
        },
    ];

    let baseline = time_page(
        PageRequest {
            name: "baseline: REST consumed-licenses page 1 (100)".to_owned(),
            path: format!("/enterprises/{enterprise}/consumed-licenses?per_page=100&page=1"),
            marker: "\"users\"",
            needs_rows: false,
        },
        requests,
        |path| client.get(format!("{http_url}{path}")).bearer_auth(token),
    )
    .await?;
    let mut timings = vec![PageTiming {
        budgeted: false,
        ..baseline
    }];
    for page in pages {
        timings.push(
            time_page(page, requests, |path| {
                client
                    .get(format!("{http_url}{path}"))
                    .header(COOKIE, &cookie)
            })
            .await?,
        );
    }
    let (first_byte, to_end) = time_csv(
        &client,
        &format!("{http_url}{}", console("downloads/consumed-licenses.csv")),
        &cookie,
        requests,
        consumed,
    )
    .await?;
    timings.push(first_byte);
    timings.push(to_end);

    let mut out = String::new();
    writeln!(
        out,
        "\nconsole pages: {requests} requests each, one client in sequence; cold = the first, p50/p99/max over the \
         others"
    )?;
    writeln!(
        out,
        "  {:<46}{:>10}{:>10}{:>10}{:>10}{:>10}{:>11}",
        "page", "cold", "p50", "p99", "max", "matching", "bytes"
    )?;
    let (mut over, mut cold_over) = (Vec::new(), Vec::new());
    for timing in &timings {
        let (p50, p99, max) = if timing.warm.is_empty() {
            (
                micros(timing.cold),
                micros(timing.cold),
                micros(timing.cold),
            )
        } else {
            (
                timing.warm.value_at_quantile(0.5),
                timing.warm.value_at_quantile(0.99),
                timing.warm.max(),
            )
        };
        writeln!(
            out,
            "  {:<46}{:>10}{:>10}{:>10}{:>10}{:>10}{:>11}",
            timing.name,
            ms(micros(timing.cold)),
            ms(p50),
            ms(p99),
            ms(max),
            timing
                .matching
                .map_or_else(|| "".to_owned(), |n| n.to_string()),
            timing.bytes
        )?;
        if timing.budgeted && Duration::from_micros(p99) > PAGE_BUDGET {
            over.push(timing.name.as_str());
        }
        if timing.budgeted && timing.cold > PAGE_BUDGET {
            cold_over.push(timing.name.as_str());
        }
    }
    if over.is_empty() {
        writeln!(
            out,
            "  every page's p99 is within {} ms",
            PAGE_BUDGET.as_millis()
        )?;
    } else {
        writeln!(
            out,
            "  over {} ms at p99: {}",
            PAGE_BUDGET.as_millis(),
            over.join(", ")
        )?;
    }
    if !cold_over.is_empty() {
        writeln!(
            out,
            "  over {} ms when cold (the first request after a sync builds a per-generation cache): {}",
            PAGE_BUDGET.as_millis(),
            cold_over.join(", ")
        )?;
    }
    Ok(out)
}

/// A path segment, percent-encoded (a person id holds `:`).
fn segment(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_people_total_is_read_from_the_page_and_person_ids_are_encoded() {
        let body = r#"<p id="people-summary"><span id="people-total">1234</span> matching"#;
        assert_eq!(people_total(body), Some(1234));
        assert_eq!(people_total("<table id=\"people\">"), None);
        assert_eq!(segment("cloud:1000042"), "cloud%3A1000042");
    }
}
