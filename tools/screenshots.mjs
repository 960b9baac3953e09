// Browser half of tools/screenshots.py (run that, not this): drives Debian's chromium with playwright-core
// through OHIF and Orthanc's own UI, served by tools/viewer.py, and writes raw full-size PNGs.
//
//   node tools/screenshots.mjs <job.json>
//
// job.json: {"base": "http://127.0.0.1:3000", "out": "<folder>", "study_uid": "...", "orthanc_study": "...",
//            "sc_series": "<Orthanc ID>", "webviewer": true, "chromium": "/usr/bin/chromium",
//            "playwright": "<path to playwright-core/index.mjs>", "phase": "main" | "sr", "label": "S:9901", "name": "<png name>"}
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const { chromium } = await import(job.playwright);
const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'cxr-shots-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: job.chromium,
  headless: true,
  viewport: { width: 1280, height: 800 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const page = await context.newPage();
const log = [];
page.on('console', (m) => {
  const text = m.text();
  if (/rehydrat|compatible|Measurement/i.test(text) || m.type() === 'error') log.push(`${m.type()}: ${text.slice(0, 300)}`);
});
page.on('requestfailed', (r) => log.push(`request failed: ${r.url()}`));

const shot = async (name) => {
  const file = path.join(job.out, `${name}.png`);
  await page.screenshot({ path: file });
  console.log(`shot ${file}`);
};
const settle = (ms) => page.waitForTimeout(ms);

async function skipTour() {
  const skip = page.getByText('Skip all', { exact: true });
  if (await skip.count()) await skip.first().click().catch(() => {});
}

async function openSeries(label) {
  // A thumbnail or a list row of OHIF's study browser, found by its series number ("S:9901").
  const item = page.locator('[data-cy^="study-browser-thumbnail"]').filter({ hasText: label }).first();
  await item.dblclick();
}

async function showSR(label, name) {
  await openSeries(label);
  await settle(8000);
  await skipTour();
  // Hover the SR badge at the top right of the viewport, when there is one, so its tooltip shows.
  const badge = page.locator('[data-cy="viewport-pane"]').first().getByText('SR', { exact: true });
  if (await badge.count()) {
    await badge.first().hover().catch(() => {});
    await settle(1500);
  }
  await shot(name);
  const text = await page.locator('[data-cy="viewport-pane"]').first().innerText().catch(() => '');
  log.push(`${name} viewport text: ${text.replace(/\s+/g, ' ').slice(0, 400)}`);
  const panelText = await page.locator('body').innerText().catch(() => '');
  const m = panelText.match(/Measurements \(\d+\)/);
  log.push(`${name} measurements panel: ${m ? m[0] : 'not shown'}`);
}

async function openStudy() {
  await page.goto(`${job.base}/viewer?StudyInstanceUIDs=${job.study_uid}`);
  await page.locator('[data-cy="study-browser-thumbnail"]').first().waitFor({ timeout: 60000 });
  await settle(6000);
  await skipTour();
  await settle(1000);
}

if (job.phase === 'sr') {
  // One SR only: job.label is its series ("S:9901"), job.name the picture's name.
  await openStudy();
  await showSR(job.label, job.name);
} else {
  // 1. OHIF: the SR, then the overlay.
  await openStudy();
  await showSR('S:9901', 'ohif-sr');
  await openSeries('S:9902');
  await settle(6000);
  await shot('ohif-overlay');

  // 2. Orthanc Explorer: the study with the node's series.
  await page.goto(`${job.base}/orthanc/app/explorer.html#study?uuid=${job.orthanc_study}`);
  await settle(4000);
  await shot('orthanc-explorer-study');

  // 3. Orthanc Web Viewer: the overlay series.
  if (job.webviewer) {
    await page.goto(`${job.base}/orthanc/web-viewer/app/viewer.html?series=${job.sc_series}`);
    await settle(8000);
    await shot('orthanc-webviewer-overlay');
  }
}

fs.appendFileSync(path.join(job.out, 'browser-log.txt'), log.join('\n') + '\n');
await context.close();
fs.rmSync(profile, { recursive: true, force: true });
