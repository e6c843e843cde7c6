"""The explorer page end to end, in a real headless Chromium driven by Playwright.

Uses Debian's chromium (/usr/bin/chromium; `.ci/run` installs it): no browser is downloaded.
The test types a prompt, watches the text stream in, clicks a generated token, checks the
probability panel and the attention heatmap, and saves a screenshot.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

from fungpt.serve import create_app, running_server  # noqa: E402

CHROMIUM = os.environ.get("FUNGPT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update"]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason=f"no Chromium at {CHROMIUM}: apt-get install chromium chromium-driver (.ci/run does)")


@pytest.fixture(scope="module")
def url(tiny_run):
    with running_server(create_app(tiny_run, device="cpu")) as base:  # the API tests' run (conftest.py)
        yield base


@pytest.fixture()
def page(tmp_path):
    with sync_api.sync_playwright() as p:
        home = tmp_path / "browser-home"  # Chromium writes its settings and crash reports under the home folder
        env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
               "XDG_CACHE_HOME": str(home / ".cache")}
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, env=env)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            pg = context.new_page()
            pg.set_default_timeout(60_000)  # generous: CI machines can be slow and busy
            problems: list[str] = []
            pg.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            pg.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            pg.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            pg.problems = problems
            yield pg
        finally:
            browser.close()


def sample(page, url: str, n: int) -> None:
    """Open the page and generate `n` tokens after "The cat" (in the tiny run's alphabet)."""
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.fill("#prompt", "The cat")
    page.fill("#max_new_tokens", str(n))
    page.click("#generate")
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")


def api_text(url: str, **body) -> str:
    """The text the API generates for these settings (what the page must show)."""
    with httpx.stream("POST", f"{url}/api/generate", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"type": "done"' in line:
                return json.loads(line[6:])["text"]
    raise AssertionError("no done event")


def test_explore_a_run_in_the_browser(url, page, tmp_path):
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    sync_api.expect(page.locator("#config")).to_contain_text("n_layer")
    sync_api.expect(page.locator("#loss path.val")).to_have_count(1)  # the loss curve is drawn
    assert page.locator("#layer option").count() == 2 and page.locator("#head option").count() == 2

    page.fill("#prompt", "The cat")
    page.fill("#max_new_tokens", "40")
    page.fill("#seed", "3")
    page.fill("#top_k", "10")
    page.click("#generate")
    tokens = page.locator("#output .tok.gen")
    tokens.first.wait_for()  # the first streamed token has appeared
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    assert tokens.count() == 40
    expected = api_text(url, prompt="The cat", max_new_tokens=40, seed=3, top_k=10, temperature=0.8)
    shown = "".join(tokens.all_text_contents()).replace("↵", "")
    assert page.locator("#output .tok.prompt").inner_text() == "The cat"
    assert shown == expected  # the page shows exactly the streamed tokens

    tokens.nth(5).click()
    sync_api.expect(tokens.nth(5)).to_have_class("tok gen selected")
    bars = page.locator("#probs .bar-row")
    sync_api.expect(bars).to_have_count(10)
    sync_api.expect(page.locator("#step-info")).to_contain_text("Step 6")
    percents = [float(t.rstrip("%")) for t in page.locator("#probs .pct").all_text_contents()]
    assert percents == sorted(percents, reverse=True) and 0 < sum(percents) <= 100.5
    assert page.locator("#probs .bar-row.chosen").count() <= 1  # the picked token, if in the top 10

    heatmap = page.locator("#heatmap")
    # Context of the 6th generated token: the 7 prompt characters and the 5 tokens before it.
    sync_api.expect(heatmap).to_have_attribute("data-t", "12")
    sync_api.expect(page.locator("#attn-info")).to_contain_text("Layer 0, head 0")
    # Two quick changes whose answers arrive out of order: the page must end on the later choice.
    held = []
    page.route("**/api/attention", lambda route: held.append(route))  # hold each request until let through below
    page.select_option("#layer", "1")  # asks for layer 1, head 0
    page.select_option("#head", "1")  # asks for layer 1, head 1
    for _ in range(500):
        if len(held) == 2:
            break
        page.wait_for_timeout(10)
    assert len(held) == 2
    held[1].continue_()  # the newer request is answered first...
    sync_api.expect(page.locator("#attn-info")).to_contain_text("Layer 1, head 1")
    with page.expect_response("**/api/attention"):
        held[0].continue_()  # ...then the older one
    page.evaluate("() => new Promise((done) => setTimeout(done, 200))")  # time for the page to handle it
    sync_api.expect(page.locator("#attn-info")).to_contain_text("Layer 1, head 1")
    page.unroute("**/api/attention")
    # The canvas really has colour in it: the first query can only attend to itself (weight 1, dark blue).
    corner = page.evaluate("() => Array.from(document.getElementById('heatmap').getContext('2d')"
                           ".getImageData(2, 2, 1, 1).data)")
    assert corner[2] > corner[0] + 50, corner  # blue, not white or grey

    shot = tmp_path / "serve.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("FUNGPT_SCREENSHOT"):  # keep a copy, e.g. for the README
        shutil.copy(shot, os.environ["FUNGPT_SCREENSHOT"])
    assert page.problems == []


def test_the_stop_at_endoftext_box_is_offered_where_the_tokenizer_has_that_token(url, page):
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    assert not page.locator("#stop_at_eot").is_visible()  # the tiny run's char tokenizer has no such token

    def with_eot(route):  # as a BPE run's server answers
        route.fulfill(json={**route.fetch().json(), "has_eot": True})

    page.route("**/api/info", with_eot)
    page.reload()
    box = page.locator("#stop_at_eot")
    sync_api.expect(box).to_be_visible()
    assert box.is_checked()  # as `fungpt sample`
    box.uncheck()
    page.fill("#prompt", "The cat")  # (in the tiny run's alphabet)
    page.fill("#max_new_tokens", "5")
    with page.expect_request("**/api/generate") as sent:
        page.click("#generate")
    assert sent.value.post_data_json["stop_at_eot"] is False
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    assert page.problems == []


def test_the_stop_box_sends_its_escapes_as_the_characters_they_name(url, page):
    """The stop box, as `fungpt sample --stop`: \\n is a newline (a one-line box holds none), \\\\ a backslash."""
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.fill("#prompt", "The cat")
    page.fill("#max_new_tokens", "5")
    page.fill("#stop_text", "a\\n\\n\\t\\\\n")
    with page.expect_request("**/api/generate") as sent:
        page.press("#stop_text", "Enter")  # (Enter in a setting's box generates)
    assert sent.value.post_data_json["stop"] == "a\n\n\t\\n"
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    assert page.problems == []


def test_a_bad_request_shows_its_error(url, page):
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.fill("#prompt", "The cat €")  # € is not in the tiny run's character vocabulary
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text(
        "'€' (U+20AC EURO SIGN) at position 8 (counting from 0) is not in this char-level vocabulary")
    sync_api.expect(page.locator("#status")).to_have_class("muted error")
    # the browser logs the 400 response itself; anything else would be a problem
    assert [p for p in page.problems if "400" not in p] == []


def test_settings_the_server_refuses_leave_the_sample_on_screen(url, page):
    """A refused request (temperature -1, said by the server) emptied the page: the sample and the token picked were
    gone under the error, while a mistake the page caught itself kept them."""
    sample(page, url, 5)
    page.locator("#output .tok.gen").nth(2).click()
    page.fill("#temperature", "-1")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("temperature: Input should be greater than or equal to 0")
    sync_api.expect(page.locator("#output .tok.gen")).to_have_count(5)
    assert [p for p in page.problems if "422" not in p] == []


def test_a_stream_that_ends_without_the_servers_last_word_says_so(url, page):
    """A stream cut short on the way (a proxy) without a "done" or "error" event left the page saying
    "generating…" over a finished sample."""
    events = "".join(f"data: {json.dumps(e)}\n\n" for e in (
        {"type": "start", "prompt_tokens": [{"id": 1, "text": "T"}], "model": "m", "step": 20},
        {"type": "token", "id": 2, "text": "h", "p": 0.5, "top": []},
        {"type": "token", "id": 3, "text": "e", "p": 0.5, "top": []}))
    page.route("**/api/generate", lambda route: route.fulfill(status=200, content_type="text/event-stream",
                                                             body=events))
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("the stream ended after 2 tokens without the server's "
                                                             "last word")


def test_an_old_attention_requests_error_is_not_shown_under_a_new_sample(url, page):
    """A late error for a token of the previous sample appeared in the new sample's cleared inspector (a late
    answer was already dropped; its error was not)."""
    held = []
    page.route("**/api/attention", lambda route: held.append(route))
    sample(page, url, 5)
    page.locator("#output .tok.gen").nth(2).click()
    sync_api.expect(page.locator("#attn-info")).not_to_contain_text("attention:")
    page.click("#generate")
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    assert held, "the attention request was not made"
    held[0].fulfill(status=400, json={"error": "boom from an old request"})
    page.wait_for_timeout(500)
    assert "boom" not in page.locator("#attn-info").inner_text()


def test_a_heatmap_cell_is_numbered_from_the_texts_first_token(url, page):
    """A map of the last block_size tokens of a longer text numbered its cells from the map's first row: "query 31"
    for the text's 46th token, where the page's notes count from the text's start."""
    sample(page, url, 40)  # "The cat" (7) + 40: past the tiny run's block_size of 32
    page.locator("#output .tok.gen").nth(39).click()  # read after 7 + 39 = 46 tokens: the model sees the last 32
    heatmap = page.locator("#heatmap")
    sync_api.expect(heatmap).to_have_attribute("data-t", "32")
    heatmap.focus()
    page.keyboard.press("ArrowLeft")
    sync_api.expect(page.locator("#attn-hover")).to_contain_text("query 45 «")  # (14 before the map + its row 31)


def test_the_loss_curves_step_axis_shows_whole_steps(url, page):
    """A run of a few steps (or only its step-0 eval) labelled its step axis 0.2, 0.4, 1.5."""
    for answer in ({"train": [], "eval": [[0, 4.19, 4.19]], "nonfinite": 0},  # (only the step-0 eval)
                   {"train": [[1, 4.0], [2, 3.9], [3, 3.8]], "eval": [], "nonfinite": 0}):
        body = json.dumps(answer)
        page.route("**/api/metrics", lambda route, _request=None, body=body: route.fulfill(
            status=200, content_type="application/json", body=body))
        page.goto(url)
        sync_api.expect(page.locator("#loss path")).not_to_have_count(0)
        # the step axis's labels: centred under it (the loss axis's stand at its left, anchored at their end)
        steps = page.eval_on_selector_all("#loss text", "ts => ts.filter(t => t.getAttribute('text-anchor') === "
                                                        "'middle').map(t => t.textContent)")
        steps = [t for t in steps if re.fullmatch(r"-?[\d.]+", t)]
        assert steps and all(float(t).is_integer() and "." not in t for t in steps), steps
        page.unroute("**/api/metrics")


def test_a_seed_javascript_cannot_hold_is_refused_not_rounded(url, page):
    """2**53 + 1 is a double's 2**53: the page would send another seed than typed, and show another text."""
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.fill("#seed", "9007199254740993")
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("seed must be a whole number from 0 to 9007199254740991")
    sync_api.expect(page.locator("#status")).to_have_class("muted error")
    assert page.locator("#output .tok").count() == 0  # nothing was generated
    assert page.problems == []


def test_what_the_page_cannot_send_as_typed_is_said_not_changed(url, page):
    """A number box holding what the browser cannot read ("5e") reads as empty, which means a default: the page
    generated with settings the user never chose. A paste longer than the server takes was cut by the browser."""
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.fill("#top_k", "")
    page.focus("#top_k")
    page.keyboard.type("5e")  # (fill refuses such text in a number box; a user can type it)
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("top-k is not a number: correct it, or empty the box")
    sync_api.expect(page.locator("#status")).to_have_class("muted error")
    assert page.locator("#output .tok").count() == 0  # nothing was generated
    page.fill("#top_k", "10")
    limit = httpx.get(f"{url}/api/info").json()["limits"]["max_prompt_chars"]
    page.fill("#prompt", "The cat " * (limit // 8 + 1))
    assert len(page.input_value("#prompt")) > limit  # the whole paste is kept...
    page.click("#generate")  # ...and the server says why it is refused
    sync_api.expect(page.locator("#status")).to_contain_text(f"this server takes at most {limit}")
    assert [p for p in page.problems if "400" not in p] == []


def test_a_lost_server_is_said_in_words(url, page):
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.route("**/api/generate", lambda route: route.abort())  # as when the server is not running
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("cannot reach the server: is fungpt serve still running?")


@pytest.mark.parametrize("answer, said", [
    ({"train": [], "eval": [], "nonfinite": 3}, "all 3 logged losses are NaN or infinite: the run diverged"),
    # (a server that sends a long curve: Math.min(...xs) overflowed the call stack past about 125,000 points)
    ({"train": [[s, 4.0 - s / 200_000] for s in range(200_000)], "eval": [], "nonfinite": 0}, "loss curve: train"),
])
def test_the_loss_curve_says_what_it_holds(url, page, answer, said):
    """A run whose logged losses were all NaN was said to have no metrics.jsonl; a very long curve did not draw."""
    page.route("**/api/metrics", lambda route: route.fulfill(status=200, content_type="application/json",
                                                            body=json.dumps(answer)))
    page.goto(url)
    sync_api.expect(page.locator("#loss")).to_have_attribute("aria-label", re.compile(re.escape(said)))
    assert page.problems == []


def test_attention_from_other_weights_than_the_samples_says_so(url, page):
    """A server started again (on another run, at the same step) answered the attention of the old sample with the
    new model's weights, without a word: the step was all the page compared."""
    sample(page, url, 5)

    def restarted(route):  # the same step, other weights
        route.fulfill(json={**route.fetch().json(), "model": "started-again"})

    page.route("**/api/attention", restarted)
    page.locator("#output .tok.gen").nth(2).click()
    sync_api.expect(page.locator("#attn-info")).to_contain_text("these weights are not those that generated the "
                                                                "sample (the server has loaded others since)")
    assert page.problems == []


def test_another_model_answering_is_shown_with_the_layer_kept(url, page):
    """The page showed the details of the model it loaded first as long as the step was the same: a server started
    again on another run, or a run trained over to the same step, answered with a model the page did not show."""
    real = httpx.get(f"{url}/api/info").json()

    def stale(route):  # what the page loaded before the server changed: another model, 5 layers
        route.fulfill(json={**real, "model": "an-earlier-one", "n_layer": 5})

    page.route("**/api/info", stale)
    page.goto(url)
    sync_api.expect(page.locator("#layer option")).to_have_count(5)
    page.select_option("#layer", "1")
    page.unroute("**/api/info")
    page.fill("#prompt", "The cat")  # (in the tiny run's alphabet)
    page.fill("#max_new_tokens", "3")
    page.click("#generate")
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    sync_api.expect(page.locator("#layer option")).to_have_count(2)  # the details of the model that answered
    assert page.input_value("#layer") == "1"  # the chosen layer, which this model has too, is kept
    assert page.problems == []


def test_the_sample_can_be_explored_with_the_keyboard(url, page):
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.fill("#prompt", "The cat")
    page.fill("#max_new_tokens", "5")
    page.focus("#generate")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    sync_api.expect(page.locator("#generate")).to_be_focused()  # not lost to the page's body
    page.keyboard.press("Tab")  # the tokens come after the controls...
    for _ in range(10):
        if page.evaluate("() => document.activeElement.classList.contains('gen')"):
            break
        page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.dataset.index") == "0"  # ...the first one first
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#step-info")).to_contain_text("Step 1")
    page.keyboard.press("ArrowRight")  # the arrows move along the sample, selecting
    sync_api.expect(page.locator("#step-info")).to_contain_text("Step 2")
    assert page.evaluate("() => document.activeElement.dataset.index") == "1"
    page.keyboard.press("End")
    sync_api.expect(page.locator("#step-info")).to_contain_text("Step 5")
    page.keyboard.press("Tab")  # the sample is one stop: Tab leaves it (200 tokens were 200 stops)
    assert not page.evaluate("() => document.activeElement.classList.contains('tok')")
    page.keyboard.press("Shift+Tab")  # and comes back to the selected token
    assert page.evaluate("() => document.activeElement.dataset.index") == "4"
    assert page.problems == []


def test_a_refusal_from_another_model_shows_that_model(url, page):
    """A server started again on another run refused what the page built for the old one ("token id 221 is not in
    the vocabulary"), and the page went on showing the old run's details under that error until reloaded."""
    real = httpx.get(f"{url}/api/info").json()
    page.route("**/api/info", lambda route: route.fulfill(json={**real, "model": "an-earlier-one", "n_layer": 5}))
    page.goto(url)
    sync_api.expect(page.locator("#layer option")).to_have_count(5)
    page.unroute("**/api/info")
    page.route("**/api/generate", lambda route: route.fulfill(status=400, json={"error": "the new model refuses"}))
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("the new model refuses (the server now serves")
    sync_api.expect(page.locator("#layer option")).to_have_count(2)  # the details of the model that answers


def test_a_long_candidate_token_is_cut_with_an_ellipsis_and_shown_whole_on_hover(url, page):
    """The candidates' column was 4.2rem wide, clipped without a mark: NORTHUMBERLAND read "NORTHUME"."""
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    widths = page.evaluate("""() => {
        drawProbs({id: 1, prob: 0.5, top: [{id: 1, text: "NORTHUMBERLAND", prob: 0.5}, {id: 2, text: "a", prob: 0.1},
                                          {id: 3, text: "x".repeat(80), prob: 0.05}]});
        return [...document.querySelectorAll("#probs .cand")].map(
            (c) => [c.scrollWidth <= c.clientWidth, c.title, getComputedStyle(c).textOverflow]);
    }""")
    assert widths[0] == [True, "«NORTHUMBERLAND», token 1", "ellipsis"]  # whole
    assert widths[2][0] is False and widths[2][2] == "ellipsis"  # cut, with a mark, and whole in its title
    assert "x" * 80 in widths[2][1]
    assert page.problems == []


def test_enter_in_a_setting_generates_and_escape_stops(url, page):
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    page.fill("#prompt", "The cat")
    page.fill("#max_new_tokens", "3")
    page.focus("#temperature")
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    page.route("**/api/generate", lambda route: None)  # a server that never answers
    page.click("#generate")
    sync_api.expect(page.locator("#status")).to_contain_text("generating")
    # (waiting: not the old sample's "done", which anything waiting for the new one took for it)
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "waiting")
    page.keyboard.press("Escape")
    sync_api.expect(page.locator("#status")).to_contain_text("stopped before the server answered")
    sync_api.expect(page.locator("#output .tok.gen")).to_have_count(3)  # (the sample before stays on screen)


def test_the_sample_follows_new_tokens_unless_the_reader_scrolled_up(url, page):
    """Each new token scrolled the sample to its end: an earlier part could not be pointed at while it streamed."""
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    add = """(n) => { for (let i = 0; i < n; i++)
        handleEvent({type: "token", id: 1, text: "line\\n", piece: "line\\n", prob: 0.5, top: []}, 0);
        const out = document.getElementById("output"); return [out.scrollTop, out.scrollHeight - out.clientHeight]; }"""
    top, end = page.evaluate(add, 60)
    assert end > 0 and top == end  # following the end
    page.evaluate("() => { document.getElementById('output').scrollTop = 0; }")
    assert page.evaluate(add, 1)[0] == 0  # the reader's place is kept
    page.evaluate("() => { const o = document.getElementById('output'); o.scrollTop = o.scrollHeight; }")
    top, end = page.evaluate(add, 1)
    assert top == end  # back at the end: following again
    # a prompt taller than the box: the new tokens are followed from the start (they came below the box, unseen)
    page.fill("#prompt", "\n".join(["The cat"] * 60))  # (in the tiny run's alphabet)
    page.fill("#max_new_tokens", "30")
    page.click("#generate")
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    top, end = page.evaluate("() => { const o = document.getElementById('output'); "
                             "return [o.scrollTop, o.scrollHeight - o.clientHeight]; }")
    assert end > 0 and top == end


def test_a_screen_reader_and_a_keyboard_can_use_the_page(url, page):
    """An accessibility audit found the sample read out as one-letter buttons, every token announced by a live region
    while the status line (start, end, errors) said nothing, no visible focus on the selected token, and a heat map
    with no text and no keyboard."""
    page.goto(url)
    sync_api.expect(page.locator("#run-summary")).to_contain_text("step 20")
    assert page.locator("h2").all_text_contents()[0].startswith("Sample")  # the cards can be found by heading
    assert page.locator("#status").get_attribute("role") == "status"
    assert page.locator("#output").get_attribute("aria-live") is None  # (announced every token, letter by letter)
    # each setting's help is read with its box, and shown as its tooltip
    described = page.evaluate("""() => { const box = document.getElementById('top_k');
        return [document.getElementById(box.getAttribute('aria-describedby')).textContent, box.closest('label').title];
    }""")
    assert described[0].startswith("Sample only among the k most likely")
    assert described[1] == " ".join(described[0].split())
    page.evaluate("""() => { window.statuses = []; new MutationObserver(() => window.statuses.push(
        document.getElementById('status').textContent)).observe(document.getElementById('status'),
        {childList: true, subtree: true, characterData: true}); }""")
    page.fill("#prompt", "The cat")
    page.fill("#max_new_tokens", "30")
    page.click("#generate")
    sync_api.expect(page.locator("#output")).to_have_attribute("data-state", "done")
    statuses = page.evaluate("() => window.statuses")
    assert len(statuses) <= 3, statuses  # "generating…", then "done: …" (not one change per token)
    assert statuses[-1].startswith("done: 30 tokens")
    options = page.get_by_role("listbox", name="generated tokens").get_by_role("option")
    assert options.count() == 30
    shown = "".join(page.locator("#output .tok.gen").all_text_contents()).replace("↵", "")
    assert page.locator("#sample-text").text_content() == f"Sample: The cat{shown}"  # the sample as one text
    labels = [options.nth(i).get_attribute("aria-label") for i in range(30)]
    texts = page.locator("#output .tok.gen").all_text_contents()
    names = {" ": "space", "↵\n": "newline", ",": "comma", ".": "period", ":": "colon", "!": "exclamation mark",
             "?": "question mark", ";": "semicolon", "'": "apostrophe", "-": "dash", "&": "ampersand"}
    for text, label in zip(texts, labels, strict=True):  # whitespace and punctuation in words, then the probability
        assert re.fullmatch(re.escape(names.get(text, text)) + r", \d+\.\d%", label), (text, label)
    said = page.evaluate("() => [' the', 'ROMEO\\n', '\\x02', ', ', '', '\u2019', '=', 'a\\x07b', '\u00e9t\u00e9']")
    assert [page.evaluate("(t) => spoken(t)", t) for t in said] == [
        "space the", "ROMEO newline", "U+0002", "comma space", "part of a character", "\u2019", "=", "a U+0007 b",
        "\u00e9t\u00e9"]  # (a code point only for a control character: screen readers name the others)
    page.fill("#prompt", "edited after the sample")  # the sample's own prompt stays in its plain text
    page.evaluate("() => describeSample()")
    assert page.locator("#sample-text").text_content() == f"Sample: The cat{shown}"

    options.nth(3).focus()
    page.keyboard.press("Enter")
    sync_api.expect(options.nth(3)).to_have_attribute("aria-selected", "true")
    # "Step 4: the model picked …" and the candidates, read with it
    assert options.nth(3).get_attribute("aria-describedby") == "step-info probs"
    page.keyboard.press("ArrowRight")
    sync_api.expect(options.nth(4)).to_have_attribute("aria-selected", "true")
    assert options.nth(3).get_attribute("aria-selected") == "false"
    assert options.nth(3).get_attribute("aria-describedby") is None
    outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none"  # the focused, selected token shows the keyboard's place

    heatmap = page.locator("#heatmap")
    sync_api.expect(heatmap).to_have_attribute("data-t", "11")  # the 7 prompt characters and 4 tokens before the 5th
    sync_api.expect(heatmap).to_have_attribute("aria-label", re.compile(r"attended most to \d+ «"))
    heatmap.focus()
    page.keyboard.press("ArrowLeft")  # the first key shows the cursor's start: the bottom row's largest weight
    sync_api.expect(page.locator("#attn-hover")).to_contain_text("query 10 «")
    page.keyboard.press("ArrowUp")
    sync_api.expect(page.locator("#attn-hover")).to_contain_text("query 9 «")
    page.keyboard.press("End")  # the row's last key the query can see: itself
    sync_api.expect(page.locator("#attn-hover")).to_contain_text("→ key 9 «")
    page.keyboard.press("ArrowRight")  # one more: a masked cell, said as such
    sync_api.expect(page.locator("#attn-hover")).to_contain_text("cannot see the later key 10")
    sync_api.expect(page.locator("#attn-said")).to_contain_text("cannot see the later key 10")  # (read out)
    page.select_option("#head", "1")  # another head of the same map: the cursor stays, and says its new weight
    sync_api.expect(page.locator("#attn-info")).to_contain_text("Layer 0, head 1")
    sync_api.expect(page.locator("#attn-hover")).to_contain_text("query 9 «")
    assert heatmap.get_attribute("role") == "application"  # (a screen reader passes it the arrow keys)
    assert "loss curve: train loss" in page.locator("#loss").get_attribute("aria-label")
    assert page.problems == []


def test_high_contrast_mode_keeps_the_bars_and_the_selected_token(url, page):
    """In forced colours (Windows' high-contrast modes) the probability bars, the selected token and the legend's
    keys took the background's colour, and vanished."""
    page.emulate_media(forced_colors="active")
    sample(page, url, 5)
    page.locator("#output .tok.gen").nth(1).click()
    sync_api.expect(page.locator("#probs .bar-row")).to_have_count(10)
    colours = page.evaluate("""() => {
        const bg = (sel) => getComputedStyle(document.querySelector(sel)).backgroundColor;
        return {bar: bg('#probs .bar'), track: bg('#probs .track'), selected: bg('.tok.selected'),
                card: bg('.card'), legend: getComputedStyle(document.querySelector('.legend.val'),
                '::before').backgroundColor}; }""")
    assert colours["bar"] != colours["track"], colours
    assert colours["selected"] != colours["card"], colours  # (the page's background, as every other token's)
    assert colours["legend"] not in ("rgba(0, 0, 0, 0)", colours["track"]), colours
