// ESLint flat config: typescript-eslint's strict, type-checked rules and the
// React hooks rules for the source; ESLint's recommended rules for the
// JavaScript tests and the e2e page. Formatting is Prettier's (`npm run lint`
// checks both).
//
// typescript-eslint needs TypeScript's JavaScript API, which TypeScript 7
// does not ship: the package named `typescript` here is the TypeScript 6 API
// (`@typescript/typescript6`), and `tsc` (the build) is TypeScript 7
// (`@typescript/native`), as in clients/js.

import js from '@eslint/js';
import { defineConfig, globalIgnores } from 'eslint/config';
import globals from 'globals';
import reactHooks from 'eslint-plugin-react-hooks';
import tseslint from 'typescript-eslint';

export default defineConfig(
  globalIgnores(['dist/', 'test-output/']),
  {
    files: ['**/*.{js,mjs,jsx,ts,tsx}'],
    extends: [js.configs.recommended],
    linterOptions: { reportUnusedDisableDirectives: 'error' },
  },
  {
    files: ['src/**/*.ts'],
    extends: [
      tseslint.configs.strictTypeChecked,
      tseslint.configs.stylisticTypeChecked,
      reactHooks.configs.flat['recommended-latest'],
    ],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
  },
  {
    files: ['test/types/**/*.tsx'],
    extends: [tseslint.configs.recommended, reactHooks.configs.flat['recommended-latest']],
  },
  {
    files: ['**/*.{js,mjs}'],
    languageOptions: { globals: globals.node },
  },
  {
    // The page built by vite runs in the browser; page.evaluate callbacks too.
    files: ['e2e/**'],
    extends: [reactHooks.configs.flat['recommended-latest']],
    languageOptions: {
      globals: { ...globals.node, ...globals.browser },
      parserOptions: { ecmaFeatures: { jsx: true } },
    },
  },
);
