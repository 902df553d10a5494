// Where the SDK's own messages go.

/** A logger: `console` fits, as do most logging libraries' loggers. */
export interface Logger {
  debug(message: string, ...details: unknown[]): void;
  info(message: string, ...details: unknown[]): void;
  warn(message: string, ...details: unknown[]): void;
  error(message: string, ...details: unknown[]): void;
}

/** The default: warnings and errors to stderr, nothing else. */
export const defaultLogger: Logger = {
  debug: () => undefined,
  info: () => undefined,
  warn: (message, ...details) => {
    console.warn(`entity-sync: ${message}`, ...details);
  },
  error: (message, ...details) => {
    console.error(`entity-sync: ${message}`, ...details);
  },
};
