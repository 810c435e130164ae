"""Screenshots of the MLflow UI in headless Chromium, to see what a reader sees: the runs table, a compare view,
a run's loss chart and the registered model's page.

    python scripts/screenshot_ui.py --backend-store-uri sqlite:////tmp/report-ui/mlflow.db --out shots \
        --experiment Default [--runs ID,ID] [--model squad-qa-local]

Starts `mlflow ui` on a free loopback port (its own process group, stopped on exit), waits until /health answers,
then saves one PNG per view (and the rendered DOM as .html with --dump-dom, to grep for text). Needs Debian's
`chromium` (apt-get install chromium). Without --runs, the experiment's newest two tune runs are compared.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Iterator

from mlflow.tracking import MlflowClient
from websockets.sync.client import ClientConnection, connect

WINDOW = "1600,1000"
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_ui(backend_store_uri: str, port: int, log_path: Path) -> Iterator[str]:
    """`mlflow ui` on 127.0.0.1:port until the block ends; yields its base URL once /health answers."""
    with open(log_path, "w", encoding="utf-8") as log:
        command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", backend_store_uri,
                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while not _answers(f"{base}/health"):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mlflow ui did not come up on {base}; see {log_path}")
            time.sleep(0.5)
        yield base
    finally:
        stop(server)


def stop(process: subprocess.Popen) -> None:
    """End a process started here in its own session and all it started (its process group, nothing else):
    politely first, then by force for whatever is left after 30 s (an MLflow server's job workers linger)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


class Page:
    """One headless Chromium tab driven over the DevTools protocol: navigate, wait until the page settles,
    dismiss MLflow's first-visit popovers and assistant panel, screenshot. (`chromium --screenshot` alone cannot
    click, and the assistant panel it leaves open covers a quarter of every page.)"""

    def __init__(self, socket: ClientConnection):
        self._socket = socket
        self._next_id = 0
        width, height = (int(n) for n in WINDOW.split(","))
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                  mobile=False)

    def call(self, method: str, **params) -> dict:
        self._next_id += 1
        self._socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:  # events arrive interleaved with answers: skip them
            message = json.loads(self._socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def show(self, url: str, settle_seconds: float) -> None:
        """Open `url`, close what covers the page, and wait until no spinner is left (or the time is up)."""
        self.call("Page.navigate", url=url)
        deadline, calm = time.monotonic() + settle_seconds, 0
        while time.monotonic() < deadline and calm < CALM_POLLS:
            time.sleep(0.5)
            self.evaluate(DISMISS_JS)
            # A page fetches in waves (runs, then their metrics): only a quiet stretch counts as loaded.
            calm = calm + 1 if self.evaluate(SETTLED_JS) else 0

    def screenshot(self, png: Path) -> None:
        png.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def dom(self, path: Path) -> None:
        path.write_text(self.evaluate("document.documentElement.outerHTML"), encoding="utf-8")


# Consecutive half-second polls without a spinner before a page counts as loaded.
CALM_POLLS = 5
# Buttons that close MLflow's assistant panel and its first-visit guidance popovers.
DISMISS_JS = """(() => {
  for (const id of ["mlflow.assistant.chat_panel.close", "mlflow.detect_issues.guidance.got_it"]) {
    document.querySelectorAll(`[data-component-id="${id}"]`).forEach(b => b.click());
  }
})()"""
SETTLED_JS = """document.readyState === "complete" && document.body.innerText.trim().length > 0
  && document.querySelectorAll(".du-bois-light-spin-spinning, [class*='skeleton' i]").length === 0"""


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Page]:
    """Headless Chromium with a DevTools port on loopback; yields its first tab."""
    browser = subprocess.Popen(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                f"--window-size={WINDOW}", "--remote-debugging-address=127.0.0.1",
                                "--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if browser.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("chromium did not start (apt-get install chromium)")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            tab = next(t for t in json.load(response) if t["type"] == "page")
        with connect(tab["webSocketDebuggerUrl"], max_size=None) as socket:
            yield Page(socket)
    finally:
        stop(browser)


def _list(values: list[str] | str) -> str:
    return urllib.parse.quote(json.dumps(values, separators=(",", ":")))


def views(client: MlflowClient, experiment_name: str, run_ids: list[str], model: str, report_run: str
          ) -> dict[str, str]:
    """File name -> hash route of MLflow 3's UI, for the views item 9 of issue 10 asks about."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no experiment {experiment_name!r}")
    eid = experiment.experiment_id
    if not run_ids:
        runs = client.search_runs([eid], "tags.`finetune.step` = 'tune'", order_by=["attributes.start_time DESC"],
                                  max_results=2)
        run_ids = [run.info.run_id for run in runs]
    pages = {"01-experiment-landing": f"#/experiments/{eid}",
             "02-runs-table": f"#/experiments/{eid}/runs?workflowType=machine_learning",
             "03-runs-chart-view": f"#/experiments/{eid}/runs?workflowType=machine_learning&compareRunsMode=CHART"}
    if run_ids:
        pages["04-compare-runs"] = f"#/compare-runs?runs={_list(run_ids)}&experiments={_list([eid])}"
        pages["05-run-overview"] = f"#/experiments/{eid}/runs/{run_ids[0]}"
        pages["06-run-metrics"] = f"#/experiments/{eid}/runs/{run_ids[0]}/model-metrics"
        pages["07-loss-chart"] = (f"#/metric?runs={_list(run_ids)}&metric={_list('train_loss')}"
                                  f"&experiments={_list([eid])}&plot_metric_keys={_list(['train_loss', 'val_loss'])}"
                                  "&plot_layout=%7B%7D&x_axis=step&y_axis_scale=linear&line_smoothness=1"
                                  "&show_point=true&deselected_curves=%5B%5D&last_linear_y_axis_range=%5B%5D")
    if report_run:
        pages["10-report-artifact"] = f"#/experiments/{eid}/runs/{report_run}/artifacts/report/report.html"
    if model:
        pages["08-registered-model"] = f"#/models/{urllib.parse.quote(model)}"
        for version in client.search_model_versions(f"name = '{model}'"):  # each version page: why its alias
            pages[f"09-model-version-{version.version}"] = (f"#/models/{urllib.parse.quote(model)}/versions/"
                                                            f"{version.version}")
    return pages


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend-store-uri", required=True)
    parser.add_argument("--out", default="shots")
    parser.add_argument("--experiment", default="Default")
    parser.add_argument("--runs", default="", help="comma-separated run ids to compare (default: newest two)")
    parser.add_argument("--model", default="", help="registered model name for the registry pages")
    parser.add_argument("--report-run", default="", help="a run holding report/report.html (a sweep parent)")
    parser.add_argument("--settle-seconds", type=float, default=20.0,
                        help="the longest to wait for a page's spinners to go")
    parser.add_argument("--only", default="", help="comma-separated view numbers to take (e.g. 01,02); default all")
    parser.add_argument("--dump-dom", action="store_true", help="also save each page's rendered DOM")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pages = views(MlflowClient(args.backend_store_uri), args.experiment,
                  [r for r in args.runs.split(",") if r], args.model, args.report_run)
    if args.only:
        pages = {name: route for name, route in pages.items() if name.split("-")[0] in args.only.split(",")}
    with mlflow_ui(args.backend_store_uri, free_port(), out / "mlflow-ui.log") as base, \
            tempfile.TemporaryDirectory() as profile, chromium(Path(profile)) as page:
        for name, route in pages.items():
            page.show(f"{base}/{route}", args.settle_seconds)
            page.screenshot(out / f"{name}.png")
            if args.dump_dom:
                page.dom(out / f"{name}.html")
            print(f"{out / name}.png: {base}/{route}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
