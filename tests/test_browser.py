"""Opt-in: the node in the real ComfyUI web UI, in headless Chromium.

Needs COMFYUI_DIR (as tests/test_real_comfyui.py), Debian's /usr/bin/chromium
(`apt-get install -y chromium`) and the `playwright` package (`pip install -e ".[browser]"`),
used only as a driver: no browser is downloaded. It starts ComfyUI with this package, adds
Empty Image and Save and Callback through the node search box, links them with the mouse,
presses the real Run button twice and checks, after each run, the preview, the `delivered`
line (its value, its label drawn on the canvas, its place) and what the open button opens,
against the URL the server sent for that run. A failure leaves a screenshot beside the
failure message.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from real_comfy import COMFYUI_DIR, free_port, start_comfy, stop, wait_up

CHROMIUM = Path("/usr/bin/chromium")
try:
    from playwright.async_api import Page, async_playwright
except ImportError:  # the optional `browser` extra
    async_playwright = None

pytestmark = [
    pytest.mark.skipif(
        not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").exists(),
        reason="set COMFYUI_DIR to a ComfyUI checkout (with main.py) to test the node in a browser",
    ),
    pytest.mark.skipif(not CHROMIUM.exists(),
                       reason="no /usr/bin/chromium (Debian: apt-get install -y chromium)"),
    pytest.mark.skipif(async_playwright is None,
                       reason="playwright is not installed (pip install -e '.[browser]')"),
]

# As root, in a sandbox with no route to the internet: no sandboxing, no GPU, and none of
# Chromium's own traffic (it would be refused, many connections at a time).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-quic", "--no-first-run", "--disable-component-update",
                 "--disable-sync"]

# Records what the canvas draws: text with its absolute position, and where images go.
RECORD_DRAWING = """
(() => {
  const proto = CanvasRenderingContext2D.prototype;
  const fillText = proto.fillText, drawImage = proto.drawImage;
  window.__drawn = null;
  const at = (ctx, x, y) => {
    const m = ctx.getTransform();
    return [m.a * x + m.e, m.d * y + m.f];
  };
  proto.fillText = function (text, x, y, ...rest) {
    if (window.__drawn && this.canvas === app.canvas.canvas) {
      window.__drawn.push({ kind: "text", text: String(text), at: at(this, x, y) });
    }
    return fillText.call(this, text, x, y, ...rest);
  };
  proto.drawImage = function (image, ...rest) {
    if (window.__drawn && this.canvas === app.canvas.canvas && rest.length >= 2) {
      const [x, y] = rest.length >= 8 ? [rest[4], rest[5]] : [rest[0], rest[1]];
      window.__drawn.push({ kind: "image", src: image?.src ?? "", at: at(this, x, y) });
    }
    return drawImage.call(this, image, ...rest);
  };
})();
"""

COURIER_NODE = "app.graph.nodes.find((n) => n.type === 'SaveAndCallback')"


async def add_node(page: Page, x: int, y: int, query: str, node_type: str,
                   titles: list[str]) -> None:
    """Double-click the canvas, search, pick the node (its display name differs by version)."""
    box = page.locator("input[placeholder*='node' i]:visible").first
    for attempt in range(3):  # a busy machine may drop a double-click on a page still settling
        await page.mouse.dblclick(x, y)
        try:
            await box.wait_for(timeout=5_000)
            break
        except Exception:
            if attempt == 2:
                raise
            await page.keyboard.press("Escape")
    await box.fill(query)
    # Enter takes the first result: wait until it is the node asked for (first line: its name)
    first = """(titles) => {
      const option = document.querySelector('[role=option]:not(:has(input))');
      const name = option?.innerText.split('\\n')[0].replace(/\\u00a0/g, ' ').trim();
      return titles.includes(name);
    }"""
    await page.wait_for_function(first, arg=titles, timeout=10_000)
    await page.keyboard.press("Enter")
    await box.wait_for(state="hidden", timeout=10_000)
    # frontend 1.49 lets the new node follow the pointer until a click places it
    await page.mouse.move(x + 5, y + 5)
    await page.mouse.click(x, y)
    await page.wait_for_function(f"() => app.graph.nodes.some((n) => n.type === '{node_type}')",
                                 timeout=10_000)


async def client_point(page: Page, expression: str) -> tuple[float, float]:
    """A point in graph coordinates (a JS expression) on the page."""
    return tuple(await page.evaluate(f"""() => {{
      const [gx, gy] = {expression};
      const [cx, cy] = app.canvas.ds.convertOffsetToCanvas([gx, gy]);
      const rect = app.canvas.canvas.getBoundingClientRect();
      return [rect.left + cx, rect.top + cy];
    }}"""))


async def drag(page: Page, start: tuple[float, float], end: tuple[float, float]) -> None:
    await page.mouse.move(*start)
    await page.mouse.down()
    await page.mouse.move((start[0] + end[0]) / 2, (start[1] + end[1]) / 2, steps=5)
    await page.mouse.move(*end, steps=5)
    await page.mouse.up()


async def drawn(page: Page, image_file: str) -> list[dict[str, Any]]:
    """What a full redraw of the canvas draws, in page coordinates, and any <img> element
    showing `image_file` (a frontend may show the preview as an element over the canvas)."""
    return list(await page.evaluate("""async (file) => {
      window.__drawn = [];
      app.canvas.draw(true, true);
      // frontend 1.49 draws preview images in a deferred pass after the frame
      await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
      const out = window.__drawn;
      window.__drawn = null;
      const canvas = app.canvas.canvas, rect = canvas.getBoundingClientRect();
      const page = ([x, y]) => [rect.left + x * rect.width / canvas.width,
                                rect.top + y * rect.height / canvas.height];
      for (const item of out) item.at = page(item.at);
      for (const img of document.querySelectorAll('img')) {
        const box = img.getBoundingClientRect();
        if (img.src.includes(file) && box.width > 0 && box.height > 0) {
          out.push({ kind: "image", src: img.src, at: [box.left, box.top] });
        }
      }
      return out;
    }""", image_file))


async def wait_until(predicate, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


async def test_the_node_in_the_real_web_ui(tmp_path, receiver):
    comfy = start_comfy(tmp_path, receiver.url, free_port(), {})
    screenshot = tmp_path / "failure.png"
    try:
        await wait_up(comfy)
        async with async_playwright() as playwright:
            context = await playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM),
                args=CHROMIUM_ARGS, headless=True, viewport={"width": 1400, "height": 900})
            page = await context.new_page()
            try:
                await run_twice_and_check(page, context, comfy.url)
            except Exception as e:
                await page.screenshot(path=str(screenshot))
                raise AssertionError(f"{type(e).__name__}: {e}\n(screenshot: {screenshot})") from e
            finally:
                await context.close()
    finally:
        stop(comfy)
    assert receiver.requests == []  # a UI run sends no callback


async def run_twice_and_check(page: Page, context: Any, url: str) -> None:
    events: list[dict[str, Any]] = []  # what the server sent this tab over its websocket

    def on_websocket(ws: Any) -> None:
        def on_frame(payload: Any) -> None:
            if isinstance(payload, str) and payload.startswith("{"):
                message = json.loads(payload)
                if message.get("type") in ("comfy-courier.images", "executed"):
                    events.append(message)
        ws.on("framereceived", on_frame)

    page.on("websocket", on_websocket)
    await page.add_init_script(RECORD_DRAWING)
    await page.goto(url)
    await page.wait_for_function("() => window.app?.canvas && window.app?.graph", timeout=60_000)
    await page.wait_for_timeout(1500)
    for _ in range(2):  # the templates dialog, a what's-new toast
        await page.keyboard.press("Escape")
    version = await page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__ ?? 'unknown'")
    print(f"ComfyUI frontend {version}")
    # an empty canvas at a known scale (the default workflow is not under test)
    await page.evaluate("""() => {
      app.graph.clear();
      app.canvas.ds.scale = 1;
      app.canvas.ds.offset = [0, 0];
      app.canvas.setDirty(true, true);
    }""")

    await add_node(page, 200, 600, "EmptyImage", "EmptyImage", ["Empty Image", "EmptyImage"])
    await add_node(page, 900, 250, "Save and Callback", "SaveAndCallback",
                   ["Save and Callback (courier)"])
    await page.evaluate(f"""() => {{  // apart, side by side, so the link is easy to draw
      app.graph.nodes.find((n) => n.type === 'EmptyImage').pos = [100, 200];
      {COURIER_NODE}.pos = [500, 200];
      app.canvas.setDirty(true, true);
    }}""")
    await page.wait_for_timeout(300)
    output = await client_point(
        page, "app.graph.nodes.find((n) => n.type === 'EmptyImage').getConnectionPos(false, 0)")
    target = await client_point(page, f"{COURIER_NODE}.getConnectionPos(true, 0)")
    await drag(page, output, target)
    linked = await page.evaluate(f"() => {COURIER_NODE}.inputs[0].link")
    assert linked is not None, "the mouse did not link Empty Image to Save and Callback"

    run_button = page.get_by_role("button", name="Run", exact=True).first
    seen: list[dict[str, Any]] = []
    label_rows: list[float] = []
    async with httpx.AsyncClient(timeout=30) as http:
        for run in range(2):
            before = len([e for e in events if e["type"] == "comfy-courier.images"])
            await run_button.click()
            delivered = await wait_until(
                lambda b=before: [e for e in events if e["type"] == "comfy-courier.images"][b:],
                120, f"run {run + 1}'s comfy-courier.images event")
            detail = delivered[0]["data"]
            [image_url] = detail["urls"]
            prompt_id = detail["prompt_id"]
            assert f"ui%2F{prompt_id}" in image_url or f"ui/{prompt_id}" in image_url
            executed = [e["data"] for e in events
                        if e["type"] == "executed" and e["data"].get("prompt_id") == prompt_id]
            preview_file = executed[0]["output"]["images"][0]["filename"]

            # the delivered line holds this run's URL, the button opens it
            await page.wait_for_function(
                f"""(url) => {{
                  const w = {COURIER_NODE}.widgets.find((w) => w.name === 'delivered');
                  return w && w.value === url;
                }}""", arg=image_url, timeout=20_000)
            state = await page.evaluate(f"""() => {{
              const node = {COURIER_NODE};
              return {{
                widgets: node.widgets.map((w) => w.name),
                preview: (node.imgs ?? []).map((i) => [i.src, i.complete && i.naturalWidth]),
                workflow: JSON.stringify(app.graph.serialize()),
              }};
            }}""")
            names = state["widgets"]
            assert names.count("delivered") == 1 and names.count("open delivered image") == 1
            assert names.index("delivered") == names.index("content_request_id") + 1, names
            assert image_url not in state["workflow"], "the URL leaked into the saved workflow"
            prompt = json.dumps(
                await page.evaluate("async () => (await app.graphToPrompt()).output"))
            assert image_url not in prompt and "delivered" not in prompt

            # the preview shows this run's file, loaded
            await page.wait_for_function(
                f"""(file) => ({COURIER_NODE}.imgs ?? []).some((i) =>
                  i.src.includes(encodeURIComponent(file)) && i.complete && i.naturalWidth > 0)""",
                arg=preview_file, timeout=20_000)

            # on the canvas: the label, this run's URL (shortened), above the preview
            texts = await drawn(page, preview_file)
            labels = [t for t in texts if t["kind"] == "text" and t["text"] == "delivered"]
            assert labels, "the `delivered` label is not drawn (hidden by the long URL?)"
            values = [t["text"] for t in texts if t["kind"] == "text"
                      and t["text"].startswith(image_url[:20]) and t["at"][1] == labels[0]["at"][1]]
            assert values, "the URL is not drawn on the delivered line"
            shown = values[0].rstrip("…")
            assert image_url.startswith(shown), (values[0], image_url)
            images = [t for t in texts if t["kind"] == "image" and preview_file in t["src"]]
            assert images, f"the preview of {preview_file} is not shown"
            assert labels[0]["at"][1] < images[0]["at"][1], "the line is below the preview"
            label_rows.append(labels[0]["at"][1])

            # the button, clicked on the canvas, opens this run's image
            button = await client_point(page, f"""(() => {{
              const node = {COURIER_NODE};
              const w = node.widgets.find((w) => w.name === 'open delivered image');
              return [node.pos[0] + node.size[0] / 2, node.pos[1] + (w.last_y ?? w.y) + 10];
            }})()""")
            async with context.expect_page(timeout=10_000) as opened:
                await page.mouse.click(*button)
            popup = await opened.value
            assert popup.url == image_url
            await popup.close()

            fetched = await http.get(image_url)
            assert fetched.status_code == 200 and fetched.content[:3] == b"\xff\xd8\xff"
            seen.append({"url": image_url, "prompt": prompt_id, "preview": preview_file})

    assert seen[0]["url"] != seen[1]["url"] and seen[0]["preview"] != seen[1]["preview"]
    assert label_rows[0] == label_rows[1], f"the delivered line moved: {label_rows}"

