"""The console in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright for Python; no
browser download) against a real `tinkerd serve` on the embedded model, after a short SFT through the SDK.

Screenshots of each page go to the test's tmp folder (`pytest --basetemp DIR` keeps them somewhere known).
Without the chromium binary or the playwright package the test skips and says which is missing.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import pytest
import tinker
from tinker import types

from tests.e2e.conftest import EMBEDDED, sft_datum

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run"]
CONSOLE = "https://tinker.thinkingmachines.ai"  # what the SDK's get_console_url links start with
OWNER, STRANGER = "tml-console-owner", "tml-console-stranger"


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                                                                 "(pip install 'tinkerd[test]')")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: apt-get install -y chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


def _step(training, datum) -> float:
    fwd = training.forward_backward([datum], "cross_entropy")
    opt = training.optim_step(types.AdamParams(learning_rate=1e-3))
    loss = fwd.result().metrics["loss:sum"]
    opt.result()
    return loss


def _sign_in(page, url: str, key: str) -> None:
    page.fill("#api_key", key)
    page.click("button[type=submit]")
    page.wait_for_load_state()


def test_the_console_shows_a_run_its_curves_checkpoint_and_playground_to_its_key_only(server, browser, tmp_path):
    service = tinker.ServiceClient(base_url=server.url, api_key=OWNER)
    training = service.create_lora_training_client(base_model=EMBEDDED, rank=8, seed=0,
                                                   user_metadata={"recipe": "console-test"}).result()
    datum = sft_datum(training.get_tokenizer(), "What is the capital of Plorbia?", "The capital of Plorbia is Vemsk.")
    losses = [_step(training, datum) for _ in range(4)]
    saved = training.save_weights_for_sampler("console").result()
    sampled = service.create_sampling_client(model_path=saved.path).result().sample(
        types.ModelInput.from_ints(datum.model_input.to_ints()[:12]), num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=8, temperature=1.0, seed=1)).result()
    run_id = training.model_id
    shots = tmp_path / "screenshots"
    shots.mkdir()

    page = browser.new_page(viewport={"width": 1280, "height": 860})
    page.goto(f"{server.url}/")
    assert page.url.startswith(f"{server.url}/signin")
    _sign_in(page, server.url, "not-a-tml-key")
    assert "That key was refused" in page.inner_text("#signin-error")
    _sign_in(page, server.url, OWNER)
    assert page.url == f"{server.url}/"
    row = page.locator(f'tr[data-run="{run_id}"]')
    assert row.count() == 1 and "active" in row.inner_text() and "recipe=console-test" in row.inner_text()
    page.screenshot(path=str(shots / "runs.png"), full_page=True)

    row.locator("a").first.click()
    page.wait_for_function("document.getElementById('chart-loss').chartPoints?.length === 4")
    points = page.eval_on_selector("#chart-loss", "el => el.chartPoints")
    assert [p[0] for p in points] == [1, 2, 3, 4]
    assert [p[1] for p in points] == pytest.approx(losses, rel=1e-6)  # the losses the SDK received
    assert len(page.eval_on_selector("#chart-lr", "el => el.chartPoints")) == 4
    assert page.eval_on_selector("#chart-sampled", "el => el.chartPoints") == [
        [1, sum(len(seq.tokens) for seq in sampled.sequences)]]
    box = page.locator("#chart-loss svg").bounding_box()
    page.mouse.move(box["x"] + box["width"] - 12, box["y"] + box["height"] / 2)  # hover near the last step
    tip = page.locator("#chart-loss .tip")
    assert tip.is_visible() and tip.get_attribute("data-step") == "4"
    assert float(tip.get_attribute("data-value")) == pytest.approx(losses[-1], rel=1e-6)

    losses.append(_step(training, datum))  # the open page picks up the new step within a poll or two
    page.wait_for_function("document.getElementById('chart-loss').chartPoints?.length === 5", timeout=15_000)
    assert page.eval_on_selector("#chart-loss", "el => el.chartPoints")[-1][1] == pytest.approx(losses[-1], rel=1e-6)
    page.screenshot(path=str(shots / "run.png"), full_page=True)

    page.goto(saved.get_console_url().replace(CONSOLE, server.url))  # the SDK's own link, host swapped
    assert page.inner_text("#tinker-path") == saved.path
    page.click("#copy-path")  # the label says so once the clipboard write resolves, for 1.5 s: polled in the page
    page.wait_for_function("document.getElementById('copy-path').textContent === 'Copied'", timeout=10_000)
    page.screenshot(path=str(shots / "checkpoint.png"), full_page=True)
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.click("#publish")  # a write: the page sends the cookie and its CSRF token to the REST route
    page.wait_for_selector("#public-badge")
    assert "Every API key" in dialogs[0] and saved.path in dialogs[0]
    page.click("#unpublish")
    page.wait_for_selector("#publish")

    page.goto(f"{server.url}/sessions")
    assert page.locator("tr[data-session]").count() == 1
    page.screenshot(path=str(shots / "sessions.png"), full_page=True)
    page.click("tr[data-session] a")
    page.wait_for_function("document.getElementById('train-rate').textContent !== '–'")
    assert float(page.inner_text("#train-rate")) > 0 and page.inner_text("#in-flight") == "0"
    assert run_id in page.inner_text("main")
    page.screenshot(path=str(shots / "session.png"), full_page=True)

    page.goto(saved.get_console_url().replace(CONSOLE, server.url))
    page.click("#open-playground")
    assert page.input_value("#model") == saved.path
    page.fill("#temperature", "0")
    page.fill("#max-tokens", "24")
    page.fill("#message", "What is the capital of Plorbia?")
    page.click("#send")
    page.wait_for_function("document.querySelector('#chat').dataset.state === 'done'", timeout=60_000)
    answer = page.locator(".msg.assistant").last
    assert "Vemsk" in answer.inner_text()
    tokens = answer.locator(".tok")
    assert tokens.count() >= 3
    logprobs = [float(tokens.nth(i).get_attribute("data-logprob")) for i in range(tokens.count())]
    assert all(lp <= 0 for lp in logprobs)
    assert "logprob" in tokens.first.get_attribute("title")
    tokens.nth(min(5, tokens.count() - 1)).hover()  # its logprob shows above it
    page.screenshot(path=str(shots / "playground.png"), full_page=True)

    stranger = browser.new_page(viewport={"width": 1280, "height": 860})
    stranger.goto(f"{server.url}/")
    _sign_in(stranger, server.url, STRANGER)
    assert stranger.locator("tr[data-run]").count() == 0 and "make demo" in stranger.inner_text("#empty")
    stranger.screenshot(path=str(shots / "stranger-runs.png"), full_page=True)
    for url in (f"/training_runs/{run_id}", saved.get_console_url().replace(CONSOLE, "")):
        response = stranger.goto(f"{server.url}{url}")
        assert response.status == 404 and "not found" in stranger.inner_text("#missing")
    stranger.goto(f"{server.url}/sessions")
    assert stranger.locator("tr[data-session]").count() == 0
    stranger.close()
    page.close()
    print(f"console screenshots: {shots}")


def test_the_jobs_pages_show_a_running_job_its_plan_and_evaluation_and_cancel_it(server, browser, tmp_path):
    """A job handed over the API shows on /jobs and its own page (plan with reasons, held-out metric before
    training); the page's Cancel button stops it with the viewer's key; another key sees neither."""
    from cookbook.jobs_data import jsonl, sft_rows

    owner = {"X-API-Key": OWNER}
    job = httpx.post(f"{server.url}/api/v1/jobs", headers=owner, timeout=60, json={
        "kind": "sft", "data": jsonl(sft_rows(60)), "base_model": EMBEDDED, "budget": "15m"}).json()
    job_id = job["id"]
    deadline = time.monotonic() + 240
    while True:  # running, with its evaluation before training recorded
        job = httpx.get(f"{server.url}/api/v1/jobs/{job_id}", headers=owner, timeout=60).json()
        if job["status"] == "running" and job.get("evals", {}).get("before"):
            break
        assert job["status"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(1)
    shots = tmp_path / "screenshots"
    shots.mkdir()

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.goto(f"{server.url}/jobs")
    _sign_in(page, server.url, OWNER)
    page.goto(f"{server.url}/jobs")
    row = page.locator("tr", has_text=job_id)
    assert row.count() == 1 and "sft" in row.inner_text() and "running" in row.inner_text()
    page.screenshot(path=str(shots / "jobs.png"), full_page=True)
    row.locator("a", has_text=job_id).click()
    page.wait_for_load_state()
    assert page.url == f"{server.url}/jobs/{job_id}"
    assert page.inner_text("#job-status") == "running"
    plan = page.inner_text("#plan")
    assert "learning_rate" in plan and "LoRA" in plan  # each choice with its reason
    assert "before" in page.inner_text("#headline")
    page.screenshot(path=str(shots / "job.png"), full_page=True)

    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.accept()))
    page.click("#cancel")
    deadline = time.monotonic() + 240
    while (status := httpx.get(f"{server.url}/api/v1/jobs/{job_id}", headers=owner, timeout=60).json()["status"]) \
            != "cancelled":
        assert status in ("running", "cancelling") and time.monotonic() < deadline, status
        time.sleep(1)
    assert job_id in dialogs[0]
    page.reload()
    assert page.inner_text("#job-status") == "cancelled" and page.locator("#cancel").count() == 0
    page.screenshot(path=str(shots / "job-cancelled.png"), full_page=True)

    stranger = browser.new_page(viewport={"width": 1280, "height": 860})
    stranger.goto(f"{server.url}/jobs")
    _sign_in(stranger, server.url, STRANGER)
    stranger.goto(f"{server.url}/jobs")
    assert stranger.locator("tr", has_text=job_id).count() == 0
    response = stranger.goto(f"{server.url}/jobs/{job_id}")
    assert response.status == 404 and "not found" in stranger.inner_text("#missing")
    stranger.close()
    page.close()
