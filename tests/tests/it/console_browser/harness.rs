//! The browser harness of the console tests: one chromedriver per test on its own port (`--port=0`, read back from
//! its first lines), one headless Chromium session with a fresh profile, and blocking wrappers over the WebDriver
//! calls so that the tests read like the rest of the end-to-end suite. Every wait polls with a deadline; the
//! browser and its driver are stopped when the harness is dropped, even when a test panics.

use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

/// How long an element or a state may take to appear. Generous: two cores are shared by several test processes.
pub const WAIT: Duration = Duration::from_secs(30);

const POLL: Duration = Duration::from_millis(50);

/// Chromium's flags: no first-run work, no network of its own (updates, sync, safe browsing), so that a test sees only
/// the aggregator's traffic and starts fast.
const CHROMIUM_FLAGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--window-size=1366,900",
];

/// Where the browser and its driver are: `LICENSE_SYNC_TEST_CHROMIUM` / `LICENSE_SYNC_TEST_CHROMEDRIVER`, else the
/// Debian packages' paths. `Err` says what is missing and how to install it.
fn browser_paths() -> std::result::Result<(PathBuf, PathBuf), String> {
    let chromium = std::env::var_os("LICENSE_SYNC_TEST_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let driver = std::env::var_os("LICENSE_SYNC_TEST_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    for path in [&chromium, &driver] {
        if !path.exists() {
            return Err(format!(
                "{} is missing (apt-get install chromium chromium-driver, or set \
                 LICENSE_SYNC_TEST_CHROMIUM and LICENSE_SYNC_TEST_CHROMEDRIVER)",
                path.display()
            ));
        }
    }
    Ok((chromium, driver))
}

/// A chromedriver process in its own process group, so that the browsers it starts are stopped with it.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    fn start(path: &Path, log: &Path) -> Result<Self> {
        let mut child = Command::new(path)
            .arg("--port=0")
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("start {}", path.display()))?;
        let stdout = child.stdout.take().context("chromedriver stdout")?;
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // "ChromeDriver was started successfully on port 36583."
                if let Some(rest) = line.split("on port ").nth(1)
                    && line.contains("started successfully")
                {
                    let _ = sender.send(rest.trim_end_matches('.').trim().to_owned());
                }
            }
        });
        let mut driver = ChromeDriver {
            child,
            url: String::new(),
        };
        let port = receiver
            .recv_timeout(WAIT)
            .context("chromedriver did not say which port it listens on")?;
        driver.url = format!("http://127.0.0.1:{port}");
        Ok(driver)
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        // The whole group: chromedriver and the Chromium processes it started (killed by this group's id only).
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A headless Chromium session against one aggregator.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    /// Held for its drop, which stops the driver and its browsers.
    _driver: ChromeDriver,
    /// The browser's profile and the driver's log, removed when the test ends.
    _profile: tempfile::TempDir,
    /// The aggregator's `http://127.0.0.1:PORT`.
    pub base: String,
}

impl Browser {
    /// Starts chromedriver and a browser session, or returns `None` after printing `SKIPPED` when Chromium or its
    /// driver is missing (a failure under `LICENSE_SYNC_REQUIRE_ALL_TESTS`).
    pub fn start(test: &str, base: &str) -> Option<Browser> {
        Self::start_with(test, base, true)
    }

    /// As [`Browser::start`], with the pages' scripts off (content setting "JavaScript: blocked"), to show what the
    /// console does without them. WebDriver's own scripts still run.
    pub fn start_without_javascript(test: &str, base: &str) -> Option<Browser> {
        Self::start_with(test, base, false)
    }

    fn start_with(test: &str, base: &str, javascript: bool) -> Option<Browser> {
        let (chromium, driver_path) = match browser_paths() {
            Ok(paths) => paths,
            Err(reason) => {
                license_sync_e2e::skip_unless_required(test, &reason);
                return None;
            }
        };
        Some(Self::launch(&chromium, &driver_path, base, javascript).expect("the browser starts"))
    }

    fn launch(
        chromium: &Path,
        driver_path: &Path,
        base: &str,
        javascript: bool,
    ) -> Result<Browser> {
        let profile = tempfile::tempdir()?;
        let driver = ChromeDriver::start(driver_path, &profile.path().join("chromedriver.log"))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let mut args: Vec<String> = CHROMIUM_FLAGS
            .iter()
            .map(|flag| (*flag).to_owned())
            .collect();
        args.push(format!(
            "--user-data-dir={}",
            profile.path().join("chromium").display()
        ));
        let mut capabilities = serde_json::Map::new();
        capabilities.insert(
            "goog:chromeOptions".to_owned(),
            json!({
                "binary": chromium,
                "args": args,
                "prefs": {
                    "profile.managed_default_content_settings.javascript": if javascript { 1 } else { 2 },
                },
            }),
        );
        let client = runtime.block_on(async {
            ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(capabilities)
                .connect(&driver.url)
                .await
        });
        let client = match client {
            Ok(client) => client,
            Err(error) => bail!(
                "no WebDriver session: {error}; chromedriver's log:\n{}",
                std::fs::read_to_string(profile.path().join("chromedriver.log"))
                    .unwrap_or_default()
            ),
        };
        Ok(Browser {
            runtime,
            client: Some(client),
            _driver: driver,
            _profile: profile,
            base: base.trim_end_matches('/').to_owned(),
        })
    }

    fn client(&self) -> &Client {
        // Set at launch and only taken in `drop`.
        self.client.as_ref().expect("a live session")
    }

    /// Runs one WebDriver future to completion.
    pub fn run<F: std::future::Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Opens a path of the aggregator (`/console/…`) and waits for the page to load.
    pub fn goto(&self, path: &str) {
        let url = format!("{}{path}", self.base);
        self.run(self.client().goto(&url))
            .unwrap_or_else(|error| panic!("open {path}: {error}"));
    }

    /// The path (and query) of the page shown now.
    pub fn path(&self) -> String {
        let url = self
            .run(self.client().current_url())
            .expect("the current URL");
        match url.query() {
            Some(query) => format!("{}?{query}", url.path()),
            None => url.path().to_owned(),
        }
    }

    /// The HTTP status of the page shown now, from the Navigation Timing entry (Chromium ≥ 109): WebDriver itself
    /// does not expose it.
    pub fn status(&self) -> u16 {
        let status = self.execute(
            "const entry = performance.getEntriesByType('navigation')[0]; \
             return entry ? entry.responseStatus : 0;",
            vec![],
        );
        status
            .as_u64()
            .and_then(|s| u16::try_from(s).ok())
            .unwrap_or(0)
    }

    /// Polls until `css` matches an element, for at most [`WAIT`]; panics with the page's path and text otherwise.
    pub fn wait(&self, css: &str) -> Element {
        let found = self.run(
            self.client()
                .wait()
                .at_most(WAIT)
                .every(POLL)
                .for_element(Locator::Css(css)),
        );
        match found {
            Ok(element) => element,
            Err(error) => panic!(
                "no element {css:?} on {} within {WAIT:?} ({error}); the page says:\n{}",
                self.path(),
                self.body_text()
            ),
        }
    }

    /// Every element matching `css` now (no wait: call after the page is known to be loaded).
    pub fn all(&self, css: &str) -> Vec<Element> {
        self.run(self.client().find_all(Locator::Css(css)))
            .unwrap_or_default()
    }

    pub fn exists(&self, css: &str) -> bool {
        !self.all(css).is_empty()
    }

    /// The visible text of the first element matching `css`, waited for.
    pub fn text(&self, css: &str) -> String {
        let element = self.wait(css);
        self.element_text(&element)
    }

    pub fn element_text(&self, element: &Element) -> String {
        self.run(element.text()).unwrap_or_default()
    }

    /// An attribute of the first element matching `css`, waited for.
    pub fn attr(&self, css: &str, name: &str) -> Option<String> {
        let element = self.wait(css);
        self.element_attr(&element, name)
    }

    pub fn element_attr(&self, element: &Element, name: &str) -> Option<String> {
        self.run(element.attr(name)).ok().flatten()
    }

    /// The whole page's visible text (for assertions on messages and for failure output).
    pub fn body_text(&self) -> String {
        self.run(self.client().find(Locator::Css("body")))
            .ok()
            .map(|body| self.element_text(&body))
            .unwrap_or_default()
    }

    /// Types into the element matching `css` (waited for).
    pub fn type_into(&self, css: &str, text: &str) {
        let element = self.wait(css);
        self.run(element.send_keys(text))
            .unwrap_or_else(|error| panic!("type into {css:?}: {error}"));
    }

    /// Sends keys to whichever element has the focus, as a person at a keyboard does.
    pub fn press(&self, keys: &str) {
        let focused = self
            .run(self.client().active_element())
            .expect("a focused element");
        self.run(focused.send_keys(keys)).expect("send keys");
    }

    /// The `id` of the focused element (empty when it has none).
    pub fn focused_id(&self) -> String {
        self.execute(
            "return document.activeElement ? document.activeElement.id : '';",
            vec![],
        )
        .as_str()
        .unwrap_or_default()
        .to_owned()
    }

    /// Clicks the element matching `css` (waited for), without waiting for anything after.
    pub fn click(&self, css: &str) {
        let element = self.wait(css);
        self.run(element.click())
            .unwrap_or_else(|error| panic!("click {css:?}: {error}"));
    }

    /// Runs `action` (a click or a key that submits a form or follows a link) and waits until a new document has
    /// loaded: the current one is marked first, so that an element of the old page is never mistaken for the new
    /// page's.
    pub fn navigating(&self, action: impl FnOnce(&Browser)) {
        self.execute("window.__licenseSyncOldPage = true;", vec![]);
        action(self);
        self.until("a new page to load", |browser| {
            let state = browser
                .run(browser.client().execute(
                    "return window.__licenseSyncOldPage ? 'old' : document.readyState;",
                    vec![],
                ))
                .ok()?;
            (state == "complete").then_some(())
        });
    }

    /// Clicks and waits for the page it leads to.
    pub fn click_and_load(&self, css: &str) {
        self.navigating(|browser| browser.click(css));
    }

    /// Runs JavaScript in the page; returns its value.
    pub fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.run(self.client().execute(script, args))
            .unwrap_or_else(|error| panic!("script {script:?}: {error}"))
    }

    /// Polls `check` until it returns `Some`, for at most [`WAIT`]; panics naming `what` and showing the page.
    pub fn until<T>(&self, what: &str, mut check: impl FnMut(&Browser) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(value) = check(self) {
                return value;
            }
            if Instant::now() > deadline {
                panic!(
                    "waited {WAIT:?} for {what} on {}; the page says:\n{}",
                    self.path(),
                    self.body_text()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// The page's accessibility problems a script can see, one line each (empty when there are none): not exactly
    /// one `h1`; a heading level skipped; a visible form control without a label (`label`, `aria-label` or
    /// `aria-labelledby`); visible text whose contrast with its background is below 4.5:1 (WCAG AA for normal text,
    /// computed from the CSS colours, backgrounds taken from the nearest ancestor that paints one).
    pub fn accessibility_problems(&self) -> Vec<String> {
        let problems = self.execute(ACCESSIBILITY_AUDIT, vec![]);
        problems
            .as_array()
            .map(|problems| {
                problems
                    .iter()
                    .filter_map(|problem| problem.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The session's cookies as the browser holds them.
    pub fn cookie_names(&self) -> Vec<String> {
        self.run(self.client().get_all_cookies())
            .unwrap_or_default()
            .iter()
            .map(|cookie| cookie.name().to_owned())
            .collect()
    }

    /// Saves the page as it looks now to `target/console-screenshots/<name>.png`, for a person to look at. Written
    /// to a temporary file and renamed, because tests in other processes may save the same page at once.
    pub fn screenshot(&self, name: &str) {
        // WebDriver captures the viewport only: the window grows to the page's height for the picture (bounded, so
        // that a runaway page cannot ask for a gigantic image), then shrinks back.
        let sizes = self.execute(
            "return [document.documentElement.scrollHeight, window.outerHeight - window.innerHeight];",
            vec![],
        );
        let page_height = sizes[0].as_u64().unwrap_or(0);
        let frame_height = sizes[1].as_u64().unwrap_or(0);
        let (width, height) = self
            .run(self.client().get_window_size())
            .expect("the window's size");
        let full_height = (page_height + frame_height).clamp(height, 6_000);
        let resize = |h: u64| {
            let h = u32::try_from(h).unwrap_or(u32::MAX);
            let w = u32::try_from(width).unwrap_or(u32::MAX);
            self.run(self.client().set_window_size(w, h))
                .expect("resize the window");
        };
        if full_height > height {
            resize(full_height);
        }
        let png = self
            .run(self.client().screenshot())
            .unwrap_or_else(|error| panic!("screenshot {name}: {error}"));
        if full_height > height {
            resize(height);
        }
        let dir = screenshot_dir();
        std::fs::create_dir_all(&dir).expect("create the screenshot directory");
        let temporary = dir.join(format!(".{name}.{}.png", std::process::id()));
        let mut file = std::fs::File::create(&temporary).expect("create a screenshot file");
        file.write_all(&png).expect("write the screenshot");
        std::fs::rename(&temporary, dir.join(format!("{name}.png")))
            .expect("rename the screenshot");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session so that Chromium exits cleanly; the driver's drop then kills whatever is left.
        if let Some(client) = self.client.take() {
            let _ = self.runtime.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), client.close()).await
            });
        }
    }
}

/// The audit of [`Browser::accessibility_problems`], run in the page.
const ACCESSIBILITY_AUDIT: &str = r#"
const problems = [];
const visible = (element) => {
  const style = getComputedStyle(element);
  const box = element.getBoundingClientRect();
  return style.visibility !== 'hidden' && style.display !== 'none' && box.width > 0 && box.height > 0;
};
const h1s = document.querySelectorAll('h1').length;
if (h1s !== 1) { problems.push(`${h1s} h1 elements (one expected)`); }
let level = 0;
for (const heading of document.querySelectorAll('h1, h2, h3, h4, h5, h6')) {
  const next = Number(heading.tagName[1]);
  if (next > level + 1) { problems.push(`heading ${heading.tagName} "${heading.textContent.trim()}" follows h${level}`); }
  level = next;
}
for (const control of document.querySelectorAll('input, select, textarea')) {
  if (control.type === 'hidden' || control.type === 'submit' || control.type === 'button' || !visible(control)) { continue; }
  const labelled = (control.labels && control.labels.length > 0) || control.getAttribute('aria-label')
    || control.getAttribute('aria-labelledby') || control.getAttribute('title');
  if (!labelled) { problems.push(`${control.tagName.toLowerCase()}[name=${control.name}] has no label`); }
}
const rgba = (text) => {
  const parts = (text.match(/[\d.]+/g) || []).map(Number);
  return { r: parts[0] || 0, g: parts[1] || 0, b: parts[2] || 0, a: parts.length > 3 ? parts[3] : 1 };
};
const luminance = (c) => {
  const channel = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
  return 0.2126 * channel(c.r) + 0.7152 * channel(c.g) + 0.0722 * channel(c.b);
};
const background = (element) => {
  for (let node = element; node && node.nodeType === 1; node = node.parentElement) {
    const color = rgba(getComputedStyle(node).backgroundColor);
    if (color.a > 0.5) { return color; }
  }
  return { r: 255, g: 255, b: 255, a: 1 };
};
const seen = new Set();
const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
for (let text = walker.nextNode(); text; text = walker.nextNode()) {
  const element = text.parentElement;
  if (!text.textContent.trim() || !element || seen.has(element) || !visible(element)) { continue; }
  if (element.closest('svg')) { continue; }
  seen.add(element);
  const fg = rgba(getComputedStyle(element).color);
  const bg = background(element);
  const [light, dark] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
  const ratio = (light + 0.05) / (dark + 0.05);
  if (ratio < 4.5) {
    problems.push(`contrast ${ratio.toFixed(2)}:1 of "${text.textContent.trim().slice(0, 40)}" (${getComputedStyle(element).color} on rgb(${bg.r}, ${bg.g}, ${bg.b}))`);
  }
}
return problems;
"#;

pub fn screenshot_dir() -> PathBuf {
    license_sync_e2e::target_root().join("console-screenshots")
}
