"""Drives the hub's fleet page in headless Chromium for tests/fleet_ui.

Reads one JSON step per line on stdin and answers one JSON line on stdout:
{"ok": true, "value": ...} or {"ok": false, "error": "..."}. Every wait is
a WebDriverWait on a condition with the step's timeout; nothing sleeps.

    python drive.py SCREENSHOT_DIR PROFILE_DIR
"""
import json
import os
import sys

from selenium import webdriver
from selenium.common.exceptions import (
    StaleElementReferenceException,
    TimeoutException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

CHROMIUM = os.environ.get("TEST_CHROMIUM", "/usr/bin/chromium")
DRIVER = os.environ.get("TEST_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser(profile):
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1400,900", "--no-first-run", "--disable-extensions",
              "--user-data-dir=" + profile):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


# Read in one script, between two of the page's renders.
ROWS = """
return Array.from(document.querySelectorAll(arguments[0])).map((r) => ({
  id: r.dataset.id || null, cls: r.className,
  cells: Array.from(r.cells).map((c) => c.innerText)}));
"""


def holds(d, step):
    """The element at step["css"] once it matches, else False."""
    els = d.find_elements(By.CSS_SELECTOR, step["css"])
    if not els:
        return step.get("absent", False) and True
    if step.get("absent"):
        return False
    el = els[0]
    if "visible" in step and el.is_displayed() != step["visible"]:
        return False
    if "text" in step and step["text"] not in el.text:
        return False
    cls = el.get_attribute("class") or ""
    if "cls" in step and step["cls"] not in cls.split():
        return False
    if "not_cls" in step and step["not_cls"] in cls.split():
        return False
    for k, v in step.get("attrs", {}).items():
        if el.get_attribute(k) != v:
            return False
    return el


def run(d, shots, step):
    # The page re-renders its tables on every refresh: an element found a
    # moment ago may be gone, so a stale one means "look again".
    wait = WebDriverWait(d, step.get("timeout", 30), poll_frequency=0.1,
                         ignored_exceptions=(StaleElementReferenceException,))
    what = step["step"]
    if what == "get":
        d.get(step["url"])
        return d.current_url
    if what == "wait":
        def text(d):
            el = holds(d, step)
            return el and (True if el is True else el.text or " ")
        return wait.until(text, "waiting for " + json.dumps(step))
    if what == "click":
        def click(d):
            el = holds(d, step)
            if el:
                el.click()
            return bool(el)
        return wait.until(click, "waiting to click " + step["css"])
    if what == "type":
        el = wait.until(lambda d: holds(d, step), "waiting to type in " + step["css"])
        el.clear()
        el.send_keys(step["keys"])
        if step.get("submit"):
            el.submit()
        return True
    if what == "rows":
        return d.execute_script(ROWS, step.get("css", "#grid tbody tr"))
    if what == "js":
        return d.execute_script(step["script"])
    if what == "shot":
        path = os.path.join(shots, step["name"] + ".png")
        d.save_screenshot(path)
        return path
    raise ValueError("unknown step " + what)


def main():
    shots, profile = sys.argv[1], sys.argv[2]
    os.makedirs(shots, exist_ok=True)
    d = browser(profile)
    try:
        print(json.dumps({"ok": True, "value": d.capabilities.get("browserVersion")}), flush=True)
        for line in sys.stdin:
            step = json.loads(line)
            if step["step"] == "quit":
                break
            try:
                out = {"ok": True, "value": run(d, shots, step)}
            except (TimeoutException, WebDriverException, ValueError, KeyError) as e:
                name = "failed-" + step["step"]
                try:
                    d.save_screenshot(os.path.join(shots, name + ".png"))
                except WebDriverException:
                    pass
                out = {"ok": False, "error": "%s: %s" % (type(e).__name__, str(e).strip()[:2000])}
            print(json.dumps(out), flush=True)
    finally:
        d.quit()


if __name__ == "__main__":
    main()
