// A jsdom window as the test process's globals, for React DOM and Testing
// Library. Imported first by a test file, before react-dom and
// @testing-library/react (which look for `document` when loaded). The
// process keeps Node's own WebSocket (the client's tests tap it): jsdom's
// is not copied over a global that exists.

import { JSDOM } from 'jsdom';

const dom = new JSDOM('<!doctype html><html><body></body></html>', {
  url: 'http://127.0.0.1/',
  pretendToBeVisual: true,
});
const { window } = dom;
for (const name of Object.getOwnPropertyNames(window)) {
  if (name in globalThis) continue;
  Object.defineProperty(globalThis, name, {
    configurable: true,
    get: () => window[name],
  });
}
// Testing Library wraps updates in act() when this is set.
globalThis.IS_REACT_ACT_ENVIRONMENT = true;

export { dom, window };
