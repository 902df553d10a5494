// Small async plumbing of the resolve stream.

/** An unbounded queue read as an async iterable (the request stream); `close()` ends it. */
export class Outbox<T> implements AsyncIterable<T> {
  #items: T[] = [];
  #closed = false;
  #wake: (() => void) | undefined;

  push(item: T): boolean {
    if (this.#closed) return false;
    this.#items.push(item);
    this.#wake?.();
    return true;
  }

  close(): void {
    this.#closed = true;
    this.#wake?.();
  }

  get closed(): boolean {
    return this.#closed;
  }

  async *[Symbol.asyncIterator](): AsyncIterator<T> {
    for (;;) {
      const item = this.#items.shift();
      if (item !== undefined) {
        yield item;
        continue;
      }
      if (this.#closed) return;
      await new Promise<void>((wake) => {
        this.#wake = wake;
      });
      this.#wake = undefined;
    }
  }
}

/**
 * What one reader received from an async iterable, taken synchronously:
 * `changed()` resolves when a message arrives or the iterable ends (so
 * waiting on it together with other things never loses a message).
 */
export class Inbox<T> {
  readonly items: T[] = [];
  #ended = false;
  error: unknown = undefined;

  /** Whether the iterable ended (or failed: see `error`). */
  hasEnded(): boolean {
    return this.#ended;
  }
  #waiters: (() => void)[] = [];

  /** Reads `source` to its end (never rejects: a failure is kept in `error`). */
  async readAll(source: AsyncIterable<T>): Promise<void> {
    try {
      for await (const item of source) {
        this.items.push(item);
        this.#notify();
      }
    } catch (err) {
      this.error = err;
    } finally {
      this.#ended = true;
      this.#notify();
    }
  }

  changed(): Promise<void> {
    if (this.items.length > 0 || this.#ended) return Promise.resolve();
    return new Promise((done) => this.#waiters.push(done));
  }

  #notify(): void {
    for (const waiter of this.#waiters.splice(0)) waiter();
  }
}

/** A promise resolved after `ms`, or when `signal` aborts; `cancel()` clears the timer. */
export function delay(
  ms: number,
  signal?: AbortSignal,
): { done: Promise<void>; cancel: () => void } {
  let timer: NodeJS.Timeout | undefined;
  let onAbort: (() => void) | undefined;
  const done = new Promise<void>((resolve) => {
    timer = setTimeout(resolve, Math.max(0, ms));
    if (signal) {
      onAbort = () => {
        resolve();
      };
      if (signal.aborted) resolve();
      else signal.addEventListener('abort', onAbort, { once: true });
    }
  });
  return {
    done,
    cancel: () => {
      clearTimeout(timer);
      if (onAbort) signal?.removeEventListener('abort', onAbort);
    },
  };
}

/** Waits until any of `promises` settles or `ms` passes (the timer is cleared either way). */
export async function raceTimeout(promises: Promise<unknown>[], ms: number): Promise<void> {
  const timer = delay(ms);
  try {
    await Promise.race([...promises, timer.done]);
  } finally {
    timer.cancel();
  }
}
