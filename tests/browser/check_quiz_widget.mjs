// A knowledge check's widget in a real JupyterLab, driven by headless Chromium. Not part of
// `make test` (it needs Debian's chromium, ~300 MB): run it by hand after changing labkit.quiz.
//
//   apt-get install chromium && (cd tests/browser && npm install --no-save playwright-core@1)
//   jupyter lab --no-browser --allow-root --port 8899 --ServerApp.token=T --notebook-dir=DIR &
//   node tests/browser/check_quiz_widget.mjs http://127.0.0.1:8899/lab/tree/quiz.ipynb?token=T OUT.png
//
// DIR/quiz.ipynb holds a cell `q98_demo = None` + `labkit.ask("q98_demo", "...", {"A": ..., "B":
// ...})`.
// Opens the notebook, runs all cells, picks choice B in the radio buttons, presses Submit and
// prints the widget's feedback; exits 1 if the widget or its feedback does not appear.
import { chromium } from "playwright-core";

const [url, shot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
try {
  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForSelector(".jp-Notebook", { timeout: 60000 });
  const select = page.locator(".jp-Dialog button", { hasText: "Select" });
  // JupyterLab asks which kernel to start the first time a notebook opens.
  if (await select.waitFor({ timeout: 30000 }).then(() => true, () => false)) await select.click();
  await page.locator(".lm-MenuBar-itemLabel", { hasText: "Run" }).click();
  await page.locator(".lm-Menu-itemLabel").getByText("Run All Cells", { exact: true }).click();
  const radio = page.locator(".widget-radio-box label", { hasText: "B)" });
  await radio.waitFor({ timeout: 90000 });
  await radio.click();
  await page.locator("button", { hasText: "Submit" }).click();
  const feedback = page.locator(".widget-output", { hasText: "q" });
  await feedback.waitFor({ timeout: 30000 });
  console.log("widget feedback:", (await feedback.innerText()).trim());
  await page.screenshot({ path: shot, fullPage: true });
} catch (err) {
  await page.screenshot({ path: shot, fullPage: true }).catch(() => {});
  console.error("FAILED:", err.message);
  process.exitCode = 1;
} finally {
  await browser.close();
}
