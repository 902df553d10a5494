// ESLint flat config: typescript-eslint's strict, type-checked rules for the
// source and the example; ESLint's recommended rules for the JavaScript
// tests. Formatting is Prettier's (`npm run lint` checks both).
//
// typescript-eslint needs TypeScript's JavaScript API, which TypeScript 7
// does not ship: the package named `typescript` here is the TypeScript 6 API
// (`@typescript/typescript6`), and `tsc` (the build) is TypeScript 7
// (`@typescript/native`).

import js from '@eslint/js';
import { defineConfig, globalIgnores } from 'eslint/config';
import globals from 'globals';
import tseslint from 'typescript-eslint';

export default defineConfig(
  globalIgnores(['dist/', 'test-output/', 'src/gen/', 'examples/dist/']),
  {
    files: ['**/*.{js,mjs,ts}'],
    extends: [js.configs.recommended],
    linterOptions: { reportUnusedDisableDirectives: 'error' },
  },
  {
    files: ['src/**/*.ts', 'examples/**/*.ts'],
    extends: [tseslint.configs.strictTypeChecked, tseslint.configs.stylisticTypeChecked],
    languageOptions: {
      parserOptions: { projectService: true, tsconfigRootDir: import.meta.dirname },
    },
  },
  {
    files: ['**/*.{js,mjs}'],
    languageOptions: { globals: { ...globals.node, WebSocket: 'readonly' } },
  },
);
