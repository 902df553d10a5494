// Headless Chromium for the browser tests (clients/js/e2e and
// clients/react/e2e): Debian's chromium, never a downloaded browser.
//
// Kept apart from harness.mjs, which the Node-only tests import too. It does
// not import playwright-core either: the caller passes its own `chromium`, so
// each package's tests run on the playwright-core of its own node_modules
// (clients/react does not need clients/js's installed).

/** Debian's `chromium` (CHROMIUM_BIN overrides). */
const CHROMIUM = process.env.CHROMIUM_BIN ?? '/usr/bin/chromium';
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

/** Launches the browser with playwright-core's `chromium` (the caller's import). */
export function launchChromium(chromium) {
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: CHROMIUM_ARGS,
  });
}
