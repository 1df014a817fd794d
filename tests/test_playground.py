"""The playground page in a real browser: Debian's headless Chromium driven by playwright against one running
server (the lively tiny base, two random LoRA adapters and a router, an API key and an admin key set).

Screenshots go to test-artifacts/playground/ (desktop and phone widths).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, adapter_archive, routed_store

from loraswap.bench.launch import launch, stop

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts" / "playground"
API_KEY, ADMIN_KEY = "k-play", "k-admin"
DESKTOP = {"width": 1280, "height": 860}
PHONE = {"width": 390, "height": 844}
QUESTION = "What are the symptoms of carditis ?"
TOKENS = 24
# Compare's streams are longer: the tiny base decodes a token in a few ms, and 24 of them can all reach the page
# between two of its renders on a busy machine, which would hide that the columns stream together.
COMPARE_TOKENS = 96


@pytest.fixture(scope="module")
def store(lively_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return routed_store(lively_base, tmp_path_factory.mktemp("playground-store"))


@pytest.fixture(scope="module")
def url(lively_base: Path, store: Path) -> Iterator[str]:
    env = {"LORASWAP_API_KEY": API_KEY, "LORASWAP_ADMIN_KEY": ADMIN_KEY}
    proc, url = launch(str(lively_base), store, quant="none", max_batch_size=4, env=env, timeout=120)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing: `make test` installs Debian's chromium when run as root")
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any, url: str) -> Iterator[Any]:
    """A fresh tab on the playground, the API key typed in. Afterwards: the page fetched nothing from
    anywhere but the server, and no script error happened."""
    context = browser.new_context(viewport=DESKTOP)
    tab = context.new_page()
    elsewhere: list[str] = []
    errors: list[str] = []
    tab.on("request", lambda r: None if r.url.startswith(url) else elsewhere.append(r.url))
    tab.on("pageerror", lambda e: errors.append(str(e)))
    # A refused request is logged by the browser itself ("Failed to load resource"); the page shows those.
    tab.on("console", lambda m: errors.append(m.text) if m.type == "error" and "Failed to load" not in m.text else None)
    tab.goto(url)
    unlock(tab)
    yield tab
    context.close()
    assert elsewhere == [] and errors == []


def unlock(tab: Any) -> None:
    tab.fill("#api-key", API_KEY)
    tab.click("#keys-form button[type=submit]")
    tab.wait_for_selector("#keys", state="hidden")


def wait_until(tab: Any, condition: str, timeout: float = 60) -> None:
    """Poll a JS expression (the page's CSP forbids the eval behind playwright's wait_for_function)."""
    deadline = time.monotonic() + timeout
    while not tab.evaluate(condition):
        assert time.monotonic() < deadline, f"still false after {timeout:.0f} s: {condition}"
        tab.wait_for_timeout(100)


def shot(tab: Any, name: str) -> None:
    tab.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def api_answer(url: str, adapter: str, question: str, max_tokens: int) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/answer",
        json={"adapter": adapter, "question": question, "max_tokens": max_tokens},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=60,
    )


# Records, for every answer card under `root`, each change of its answer's length: [[adapter, length], ...].
WATCH = """root => {
  window.seen = [];
  const last = new Map();
  const box = document.querySelector(root);
  new MutationObserver(() => {
    for (const card of box.querySelectorAll('.card')) {
      const n = card.querySelector('.answer').textContent.length;
      if (n && last.get(card) !== n) { last.set(card, n); window.seen.push([card.dataset.adapter, n]); }
    }
  }).observe(box, {subtree: true, childList: true, characterData: true});
}"""


def test_page_and_assets_are_served_by_the_api_process(url: str) -> None:
    page = httpx.get(url)  # the page holds no data: it needs no key (the API calls it makes do)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for src in ('src="playground/app.js"', 'src="playground/adapters.js"', 'href="playground/style.css"'):
        assert src in page.text
    for name in ("app.js", "adapters.js"):
        js = httpx.get(f"{url}/playground/{name}")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    missing = httpx.get(f"{url}/playground/secret.txt")
    assert missing.status_code == 404 and "no playground file" in missing.json()["error"]["message"]
    assert httpx.get(f"{url}/v1/models").status_code == 401  # the API still needs its key


def test_the_page_asks_for_the_key_then_streams_an_answer(browser: Any, url: str) -> None:
    context = browser.new_context(viewport=DESKTOP)
    tab = context.new_page()
    tab.goto(url)
    tab.wait_for_selector("#keys", state="visible")
    assert "this server needs 'Authorization: Bearer <api key>'" in tab.inner_text("#keys-why")
    assert tab.evaluate("document.activeElement.id") == "api-key"
    shot(tab, "key-desktop")
    tab.fill("#api-key", "wrong")
    tab.press("#api-key", "Enter")
    tab.wait_for_selector("#keys-why:has-text('The server refused this key')")
    unlock(tab)
    assert tab.inner_text("#server-info").endswith("· 2 adapters")
    assert tab.evaluate("Object.keys(sessionStorage).length + Object.keys(localStorage).length") == 0

    want = api_answer(url, "symptoms", QUESTION, TOKENS).json()
    tab.select_option("#ask-adapter", "symptoms")
    tab.fill("#ask-max-tokens", str(TOKENS))
    tab.fill("#ask-question", QUESTION)
    tab.evaluate(WATCH, "#ask-out")
    tab.press("#ask-question", "Control+Enter")  # the keyboard sends it
    tab.wait_for_selector("#ask-out .card[data-state=done]")
    assert tab.inner_text("#ask-out .answer") == want["answer"]
    assert f"{want['usage']['completion_tokens']} tokens" in tab.inner_text("#ask-out .stats")
    lengths = [n for _, n in tab.evaluate("window.seen")]
    # Streamed: the answer grew in several steps before it was whole, not all at once.
    assert len(lengths) >= 3 and lengths == sorted(lengths) and lengths[-1] == len(want["answer"])
    shot(tab, "ask-desktop")

    routed = api_answer(url, "auto", "What are the treatments for nephritis ?", 8).json()
    tab.select_option("#ask-adapter", "auto")
    tab.fill("#ask-max-tokens", "8")
    tab.fill("#ask-question", "What are the treatments for nephritis ?")
    tab.click("#ask-go")
    tab.wait_for_selector("#ask-out .card[data-state=done]")
    assert routed["adapter"] == "treatment"
    assert tab.inner_text("#ask-out .routed .used") == "treatment"
    assert "“treatment”" in tab.inner_text("#ask-out .routed")
    assert tab.inner_text("#ask-out .answer") == routed["answer"]
    shot(tab, "ask-auto-desktop")

    tab.select_option("#ask-adapter", "symptoms")
    tab.fill("#ask-max-tokens", "400")
    tab.click("#ask-go")
    tab.wait_for_selector("#ask-out .card[data-state=streaming] .answer:not(:empty)")
    tab.click("#ask-stop")
    tab.wait_for_selector("#ask-out .card[data-state=stopped]")
    assert tab.inner_text("#ask-out .stats") == "Stopped." and tab.is_enabled("#ask-go")
    context.close()


def test_compare_streams_three_columns_together(page: Any, url: str) -> None:
    page.focus("#tab-ask")
    page.keyboard.press("ArrowRight")  # tabs follow the arrow keys
    assert page.is_visible("#panel-compare") and page.evaluate("document.activeElement.id") == "tab-compare"
    picked = ["base", "symptoms", "treatment"]  # in the order of the choices
    for box in page.query_selector_all("#cmp-choices input"):
        box.set_checked(box.get_attribute("value") in picked)
    page.fill("#cmp-max-tokens", str(COMPARE_TOKENS))
    page.fill("#cmp-question", QUESTION)
    page.evaluate(WATCH, "#cmp-columns")
    page.click("#cmp-go")
    wait_until(page, "document.querySelectorAll('#cmp-columns .card[data-state=done]').length === 3")
    cards = page.query_selector_all("#cmp-columns .card")
    assert [c.get_attribute("data-adapter") for c in cards] == picked
    answers = {c.get_attribute("data-adapter"): c.query_selector(".answer").inner_text() for c in cards}
    for name in picked:
        assert answers[name] == api_answer(url, name, QUESTION, COMPARE_TOKENS).json()["answer"], name
    assert len(set(answers.values())) == 3  # each adapter changes the answer
    # Together: every column had text before any column was complete.
    seen = page.evaluate("window.seen")
    first = {name: next(i for i, (a, _) in enumerate(seen) if a == name) for name in picked}
    done = {name: next(i for i, (a, n) in enumerate(seen) if a == name and n == len(answers[name])) for name in picked}
    assert max(first.values()) < min(done.values()), seen
    boxes = [c.bounding_box() for c in cards]
    assert len({round(b["y"]) for b in boxes}) == 1 and len({round(b["x"]) for b in boxes}) == 3  # side by side
    shot(page, "compare-desktop")
    page.set_viewport_size(PHONE)
    boxes = [c.bounding_box() for c in cards]
    assert len({round(b["x"]) for b in boxes}) == 1  # stacked on a phone
    shot(page, "compare-phone")


def test_upload_use_then_delete_an_adapter(page: Any, url: str, lively_base: Path, tmp_path: Path) -> None:
    page.click("#tab-adapters")
    page.wait_for_selector("#ad-rows tr[data-name=symptoms]")
    row = page.query_selector("#ad-rows tr[data-name=symptoms]")
    cells = {td.get_attribute("data-label"): td.inner_text() for td in row.query_selector_all("td")}
    assert cells["Qtype"] == "symptoms" and cells["Rank"] == "8" and cells["Method"] == "lora"
    assert "KiB" in cells["Size"] and cells["Loaded"] in ("yes", "no") and cells["Base"].startswith("lively-llama")

    path = tmp_path / "fresh.tar.gz"
    path.write_bytes(adapter_archive(lively_base, seed=3))
    page.fill("#up-name", "fresh")
    page.set_input_files("#up-file", str(path))
    page.click("#up-go")  # no admin key yet: the API's own words come back
    page.wait_for_selector("#up-error:visible")
    assert page.inner_text("#up-error").startswith("admin routes need 'Authorization: Bearer <admin key>'")
    assert page.evaluate("document.activeElement.id") == "admin-key"
    page.fill("#admin-key", ADMIN_KEY)
    page.click("#up-go")
    page.wait_for_selector("#up-status:has-text('Uploaded fresh')")
    page.wait_for_selector("#ad-rows tr[data-name=fresh]")
    assert page.is_hidden("#up-error")
    shot(page, "adapters-desktop")

    page.click("#tab-ask")
    page.select_option("#ask-adapter", "fresh")
    page.fill("#ask-max-tokens", "6")
    page.fill("#ask-question", QUESTION)
    page.click("#ask-go")
    page.wait_for_selector("#ask-out .card[data-state=done]")
    assert page.inner_text("#ask-out .answer") == api_answer(url, "fresh", QUESTION, 6).json()["answer"]

    page.click("#tab-adapters")
    page.wait_for_selector("#ad-rows tr[data-name=fresh] td[data-label=Loaded]:has-text('yes')")
    page.once("dialog", lambda d: d.accept())
    page.click("#ad-rows tr[data-name=fresh] button")
    page.wait_for_selector("#ad-status:has-text('Deleted fresh')")
    page.wait_for_selector("#ad-rows tr[data-name=fresh]", state="detached")
    assert "fresh" not in page.eval_on_selector_all("#ask-adapter option", "os => os.map(o => o.value)")
    assert api_answer(url, "fresh", QUESTION, 2).status_code == 404
    page.set_viewport_size(PHONE)
    shot(page, "adapters-phone")


def test_an_unknown_adapter_shows_the_api_error(browser: Any, url: str, lively_base: Path) -> None:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    files = {"file": ("g.tar.gz", adapter_archive(lively_base, seed=4), "application/gzip")}
    assert httpx.post(f"{url}/v1/adapters", data={"name": "ghost"}, files=files, headers=admin).status_code == 201
    context = browser.new_context(viewport=PHONE)
    tab = context.new_page()
    tab.goto(url)
    unlock(tab)
    tab.select_option("#ask-adapter", "ghost")
    assert httpx.delete(f"{url}/v1/adapters/ghost", headers=admin).status_code == 204  # gone behind the page
    want = api_answer(url, "ghost", QUESTION, 4).json()["error"]["message"]
    assert "adapter 'ghost' not found" in want
    tab.fill("#ask-question", QUESTION)
    tab.click("#ask-go")
    tab.wait_for_selector("#ask-out .card[data-state=error]")
    shown = tab.inner_text("#ask-out .card .error")
    assert shown.startswith(want) and "HTTP 404" in shown and "model_not_found" in shown
    wait_until(tab, "![...document.querySelectorAll('#ask-adapter option')].some(o => o.value === 'ghost')")
    shot(tab, "error-phone")
    context.close()


# Contrast of every visible text against the background it is drawn on (WCAG's relative luminance).
CONTRAST = """() => {
  const rgb = s => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = ([r, g, b]) => [r, g, b].map(v => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4)
    .reduce((acc, v, i) => acc + v * [0.2126, 0.7152, 0.0722][i], 0);
  const background = el => {
    for (; el; el = el.parentElement) {
      const c = rgb(getComputedStyle(el).backgroundColor);
      if (c.length === 3 || c[3] > 0) return c.slice(0, 3);
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.querySelectorAll('body *')) {
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (!own || !el.checkVisibility() || el.closest(':disabled')) continue;
    const style = getComputedStyle(el);
    const [a, b] = [lum(rgb(style.color).slice(0, 3)), lum(background(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    const large = parseFloat(style.fontSize) >= 24 || (parseFloat(style.fontSize) >= 18.66 && style.fontWeight >= 700);
    if (ratio < (large ? 3 : 4.5)) low.push(`${el.tagName}#${el.id}.${el.className}: ${ratio.toFixed(2)}`);
  }
  return low;
}"""

# Form controls without a label, and buttons without a name.
UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button')]
  .filter(el => el.checkVisibility())
  .filter(el => el.tagName === 'BUTTON' ? !(el.textContent.trim() || el.getAttribute('aria-label'))
                                        : !(el.labels.length || el.getAttribute('aria-label')))
  .map(el => el.id || el.outerHTML.slice(0, 80))"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_accessible_on_desktop_and_phone(browser: Any, url: str, scheme: str) -> None:
    for viewport in (DESKTOP, PHONE):
        context = browser.new_context(viewport=viewport, color_scheme=scheme)
        tab = context.new_page()
        tab.goto(url)
        tab.wait_for_selector("#keys-why:has-text('needs an API key')")
        assert tab.evaluate(CONTRAST) == [] and tab.evaluate(UNLABELLED) == []
        unlock(tab)
        for tab_id in ("tab-ask", "tab-compare", "tab-adapters"):
            tab.click(f"#{tab_id}")
            if tab_id == "tab-adapters":
                tab.wait_for_selector("#ad-rows tr")
            assert tab.evaluate(CONTRAST) == [], tab_id
            assert tab.evaluate(UNLABELLED) == [], tab_id
            # Nothing wider than the screen; every button big enough to tap (44 px).
            assert tab.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), tab_id
            small = tab.eval_on_selector_all(
                "button, [role=tab]",
                "bs => bs.filter(b => b.checkVisibility() && b.getBoundingClientRect().height < 44).map(b => b.id)",
            )
            assert small == [], tab_id
        tab.focus("#tab-adapters")
        tab.keyboard.press("Home")
        assert tab.is_visible("#panel-ask") and tab.evaluate("document.activeElement.id") == "tab-ask"
        tab.keyboard.press("End")
        assert tab.is_visible("#panel-adapters") and tab.evaluate("document.activeElement.id") == "tab-adapters"
        shot(tab, f"adapters-{scheme}-{'phone' if viewport is PHONE else 'desktop'}")
        context.close()
