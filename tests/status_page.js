// Opens tern's status page in headless Chromium and waits (up to 60 s) until it shows non-zero
// message rates; prints what the page shows, read from its DOM, as one JSON line, and saves a
// screenshot.   node status_page.js URL CHROMIUM SCREENSHOT.png
const { chromium } = require("playwright-core");
const [url, executablePath, shot] = process.argv.slice(2);
(async () => {
  const browser = await chromium.launch({ executablePath, args: ["--no-sandbox", "--disable-gpu"] });
  try {
    const page = await browser.newPage({ viewport: { width: 1100, height: 560 } });
    await page.goto(url);
    await page.waitForFunction(() => {
      const n = id => parseFloat((document.getElementById(id).textContent || "").replace(/[^0-9.]/g, "")) || 0;
      return n("rate-in") > 0 && n("rate-out") > 0 && n("p99") > 0;
    }, null, { timeout: 60000, polling: 250 });
    // More polls so the charts have a few points (WAIT_MS: longer, for a screenshot).
    await page.waitForTimeout(parseInt(process.env.WAIT_MS || "4500", 10));
    const shown = await page.evaluate(() =>
      Object.fromEntries(["connections", "rate-in", "rate-out", "drops", "p99", "p50", "sessions"]
        .map(id => [id, document.getElementById(id).textContent])));
    await page.screenshot({ path: shot });
    console.log(JSON.stringify(shown));
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(String(e)); process.exit(1); });
