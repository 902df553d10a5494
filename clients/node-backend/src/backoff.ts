// Delays between attempts: doubling from a floor to a ceiling, jittered.

/**
 * Exponential backoff. Each delay is drawn from the upper half of its step
 * (`step/2 .. step`), so backends that lost the same node do not all come
 * back at the same instant.
 */
export class Backoff {
  readonly #min: number;
  readonly #max: number;
  #step: number;
  readonly #random: () => number;

  constructor(minMs: number, maxMs: number, random: () => number = Math.random) {
    this.#min = minMs;
    this.#max = Math.max(minMs, maxMs);
    this.#step = minMs;
    this.#random = random;
  }

  /** The next delay in milliseconds; the one after it is twice as long, up to the ceiling. */
  nextDelay(): number {
    const step = this.#step;
    this.#step = Math.min(step * 2, this.#max);
    return step / 2 + (this.#random() * step) / 2;
  }

  /** Back to the floor (after a success). */
  reset(): void {
    this.#step = this.#min;
  }
}
