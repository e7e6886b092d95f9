"""The page in headless Chromium: listing, viewing, live arrival, hostile HTML, delete.

Each test drives the real page served by the ``smtp_sink_web`` fixture; some save
screenshots (see ``conftest.py``; docs/web.md shows ``web-message.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from webtools import PAGE_BODY, Browser, Spy, http, sent

from triomail._cli import main
from triomail._web.serve import SinkPage

pytestmark = pytest.mark.smtp_sink(tls=False)

TEMPLATE = """\
TO: {{name}} <{{email}}>
SUBJECT: Welcome, {{name}}
FROM: Shop <news@example.com>
CONTENT-TYPE: text/markdown

# Hello {{name}}

Your **number** is {{number}}.
"""

HOSTILE = """\
<html><body>
<p id="script">script did not run</p>
<p id="handler">handler did not run</p>
<script>document.getElementById("script").textContent = "script ran";</script>
<img src="data:," onerror="document.getElementById('handler').textContent = 'handler ran'">
</body></html>
"""


def html_message(subject: str, html: str) -> bytes:
    return (
        f"From: Mallory <mallory@example.org>\r\nTo: you@example.net\r\nSubject: {subject}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        + html.replace("\n", "\r\n")
    ).encode()


def by_css(selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return (By.CSS_SELECTOR, selector)


def rows(driver: Any) -> list[Any]:
    elements: list[Any] = driver.find_elements(*by_css("#list tbody tr"))
    return elements


def texts(driver: Any, selector: str) -> list[str]:
    """The visible texts of the elements, read in one step (the list may re-render)."""
    script = "return [...document.querySelectorAll(arguments[0])].map(e => e.innerText);"
    found: list[str] = driver.execute_script(script, selector)
    return found


async def open_page(browser: Browser, page: SinkPage, count: int) -> None:
    await browser.run(browser.driver.get, page.url)
    await browser.wait(lambda d: len(rows(d)) == count and texts(d, "#count") != [""])


async def open_message(browser: Browser, index: int = 0) -> None:
    click = "document.querySelectorAll('#list tbody tr')[arguments[0]].click();"
    await browser.run(browser.driver.execute_script, click, index)
    await browser.wait(lambda d: d.find_element(*by_css("#view")).is_displayed())


async def frame_texts(browser: Browser, *ids: str) -> list[str]:
    """The text of elements inside the message frame (then back to the page)."""

    def read() -> list[str]:
        driver = browser.driver
        driver.switch_to.frame(driver.find_element(*by_css("#v-html")))
        try:
            return [driver.find_element("id", name).text for name in ids]
        finally:
            driver.switch_to.default_content()

    return await browser.run(read)


async def test_a_campaign_message_is_listed_and_shown(
    smtp_sink_web: SinkPage, browser: Browser, tmp_path: Path
) -> None:
    rows_file = tmp_path / "rows.csv"
    rows_file.write_text("email,name,number\nann@example.com,Ann,7\nbo@example.com,Bo,8\n")
    template = tmp_path / "template.txt"
    template.write_text(TEMPLATE)
    server = f"smtp+plain://127.0.0.1:{smtp_sink_web.sink.port}"
    code = await trio.to_thread.run_sync(
        main,
        [
            "send",
            str(rows_file),
            str(template),
            "--server",
            server,
            "--journal",
            str(tmp_path / "j"),
        ],
    )
    assert code == 0
    await open_page(browser, smtp_sink_web, 2)
    listed = await browser.run(texts, browser.driver, "#list tbody tr")
    assert any("Welcome, Ann" in row and "ann@example.com" in row for row in listed)
    await browser.shot("web-list")

    await open_message(browser, next(i for i, row in enumerate(listed) if "Ann" in row))
    await browser.wait(lambda d: d.find_element(*by_css("#v-subject")).text == "Welcome, Ann")
    frame_heading = await browser.run(
        lambda: (
            browser.driver.switch_to.frame(browser.driver.find_element(*by_css("#v-html"))),
            browser.driver.find_element(*by_css("h1")).text,
            browser.driver.switch_to.default_content(),
        )[1]
    )
    assert frame_heading == "Hello Ann"
    await browser.shot("web-message")

    await browser.run(lambda: browser.driver.find_element(*by_css("[data-tab=text]")).click())
    text = await browser.run(lambda: browser.driver.find_element(*by_css("#v-text")).text)
    assert "Your **number** is 7." in text
    await browser.run(lambda: browser.driver.find_element(*by_css("[data-tab=headers]")).click())
    headers = await browser.run(texts, browser.driver, "#v-headers tr")
    assert "Subject\tWelcome, Ann" in headers
    assert "From\tShop <news@example.com>" in headers
    await browser.run(lambda: browser.driver.find_element(*by_css("[data-tab=session]")).click())
    session = await browser.run(texts, browser.driver, "#v-session tr")
    assert "TLS\tno" in session and "RCPT TO\tann@example.com" in session
    await browser.run(lambda: browser.driver.find_element(*by_css("[data-tab=html]")).click())


async def test_a_new_message_appears_without_a_reload(
    smtp_sink_web: SinkPage, browser: Browser
) -> None:
    await open_page(browser, smtp_sink_web, 0)
    await browser.wait(lambda d: "on" in d.find_element(*by_css("#live")).get_attribute("class"))
    await browser.run(browser.driver.execute_script, "window.notReloaded = true;")
    await sent(smtp_sink_web.sink.port, html_message("Arrived live", "<p>live</p>"))
    await browser.wait(lambda d: len(rows(d)) == 1)
    assert "Arrived live" in (await browser.run(texts, browser.driver, "#list tbody tr"))[0]
    assert await browser.run(browser.driver.execute_script, "return window.notReloaded;") is True


async def test_scripts_and_event_handlers_do_not_run(
    smtp_sink_web: SinkPage, browser: Browser, spy: Spy
) -> None:
    # Outside the sandbox the same HTML runs both: the test would notice if they ran.
    PAGE_BODY[0] = HOSTILE
    await browser.run(browser.driver.get, spy.url + "/page")
    await browser.wait(lambda d: d.find_element("id", "handler").text == "handler ran")
    assert (
        await browser.run(lambda: browser.driver.find_element("id", "script").text) == "script ran"
    )

    await sent(smtp_sink_web.sink.port, html_message("Hostile", HOSTILE))
    await open_page(browser, smtp_sink_web, 1)
    await open_message(browser)
    await browser.wait(
        lambda d: d.find_element(*by_css("#v-html")).get_attribute("src").endswith("/html")
    )
    await trio.sleep(0.5)  # time for a handler to fire, were it allowed to
    assert await frame_texts(browser, "script", "handler") == [
        "script did not run",
        "handler did not run",
    ]
    await browser.shot("web-hostile")


async def test_remote_images_load_only_when_allowed(
    smtp_sink_web: SinkPage, browser: Browser, spy: Spy
) -> None:
    html = (
        f'<p id="here">with a picture</p><img src="{spy.url}/pixel.gif" width="20" height="20">'
        f'<div style="background: url({spy.url}/background.gif)">styled</div>'
        # Other remote loads stay blocked even after images are allowed:
        f'<link rel="stylesheet" href="{spy.url}/style.css">'
        f'<iframe src="{spy.url}/frame"></iframe>'
        f'<meta http-equiv="refresh" content="0; url={spy.url}/refresh">'
    )
    await sent(smtp_sink_web.sink.port, html_message("Remote image", html))
    await open_page(browser, smtp_sink_web, 1)
    await open_message(browser)
    assert await frame_texts(browser, "here") == ["with a picture"]
    await trio.sleep(1.0)  # time for a fetch, were it allowed
    assert spy.hits == {}
    await browser.run(lambda: browser.driver.find_element("id", "remote").click())
    await browser.wait(lambda d: spy.count("/pixel.gif") > 0 and spy.count("/background") > 0)
    assert await frame_texts(browser, "here") == ["with a picture"]
    await trio.sleep(0.5)
    assert set(spy.hits) == {"/pixel.gif", "/background.gif"}


async def test_delete_one_and_all(smtp_sink_web: SinkPage, browser: Browser) -> None:
    for subject in ("First", "Second", "Third"):
        await sent(smtp_sink_web.sink.port, html_message(subject, f"<p>{subject}</p>"))
    await open_page(browser, smtp_sink_web, 3)
    await open_message(browser, 1)  # "Second"
    await browser.run(lambda: browser.driver.find_element("id", "delete").click())
    await browser.wait(lambda d: len(rows(d)) == 2)
    listed = await browser.run(texts, browser.driver, "#list tbody tr")
    assert "Third" in listed[0] and "First" in listed[1]
    assert not await browser.run(
        lambda: browser.driver.find_element(*by_css("#view")).is_displayed()
    )
    assert [
        m["subject"]
        for m in (await http("GET", smtp_sink_web.url + "api/messages")).json()["messages"]
    ] == ["Third", "First"]
    await browser.run(lambda: browser.driver.find_element("id", "delete-all").click())
    await browser.wait(lambda d: len(rows(d)) == 0 and texts(d, "#count") == ["no messages"])
    assert smtp_sink_web.store.ids() == []


async def test_search_by_address_and_subject(smtp_sink_web: SinkPage, browser: Browser) -> None:
    port = smtp_sink_web.sink.port
    await sent(port, html_message("Invoice 42", "<p>pay</p>"), to="ann@example.net")
    await sent(port, html_message("Newsletter", "<p>read</p>"), to="bo@example.net")
    await open_page(browser, smtp_sink_web, 2)
    search = await browser.run(browser.driver.find_element, "id", "search")
    for query, subject in [("ANN@example", "Invoice 42"), ("newsletter", "Newsletter")]:
        await browser.run(search.clear)
        await browser.run(search.send_keys, query)

        def only(driver: Any, subject: str = subject) -> bool:
            found = texts(driver, "#list tbody tr")
            return len(found) == 1 and subject in found[0]

        await browser.wait(only)
