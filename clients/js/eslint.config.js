// ESLint flat config: typescript-eslint's strict, type-checked rules for the
// source; its recommended rules for the declarations' usage test (code that
// is compiled, never run, with deliberate type errors); ESLint's recommended
// rules for the JavaScript tests. Formatting is Prettier's (`npm run lint` checks both).
//
// typescript-eslint needs TypeScript's JavaScript API, which TypeScript 7
// does not ship: the package named `typescript` here is the TypeScript 6 API
// (`@typescript/typescript6`), and `tsc` (the build) is TypeScript 7
// (`@typescript/native`), the side-by-side setup TypeScript documents.

import js from '@eslint/js';
import { defineConfig, globalIgnores } from 'eslint/config';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default defineConfig(
  globalIgnores(['dist/', 'test-output/']),
  {
    files: ['**/*.{js,mjs,ts}'],
    extends: [js.configs.recommended],
    linterOptions: { reportUnusedDisableDirectives: 'error' },
  },
  {
    files: ['src/**/*.ts'],
    extends: [tseslint.configs.strictTypeChecked, tseslint.configs.stylisticTypeChecked],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
  },
  {
    files: ['test/types/**/*.ts'],
    extends: [tseslint.configs.recommended],
  },
  {
    files: ['**/*.{js,mjs}'],
    languageOptions: { globals: globals.node },
  },
  {
    // page.evaluate / waitForFunction callbacks run in the browser.
    files: ['e2e/**'],
    languageOptions: { globals: { ...globals.node, ...globals.browser } },
  },
);
