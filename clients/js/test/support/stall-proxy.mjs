// A TCP proxy in front of the node that can stop forwarding without closing
// anything: the sockets stay open on both sides and every byte is dropped,
// like a network that silently lost the connection (a NAT that forgot it, a
// laptop that slept). Connections made after `stall()` are forwarded again.

import { createServer, connect } from 'node:net';

export class StallProxy {
  /** Listens on 127.0.0.1 (a port of its own) and forwards to `targetPort`. */
  static async start(targetPort) {
    const proxy = new StallProxy(targetPort);
    await new Promise((done) => proxy.server.listen(0, '127.0.0.1', done));
    proxy.port = proxy.server.address().port;
    return proxy;
  }

  constructor(targetPort) {
    /** Every connection so far: `{ client, upstream, stalled, bytes }`. */
    this.connections = [];
    this.server = createServer((client) => {
      const upstream = connect(targetPort, '127.0.0.1');
      const connection = { client, upstream, stalled: false, dropped: 0 };
      this.connections.push(connection);
      const forward = (from, to) => {
        from.on('data', (chunk) => {
          if (connection.stalled) connection.dropped += chunk.length;
          else to.write(chunk);
        });
        from.on('end', () => {
          if (!connection.stalled) to.end();
        });
        from.on('error', () => to.destroy());
        from.on('close', () => {
          if (!connection.stalled) to.destroy();
        });
      };
      forward(client, upstream);
      forward(upstream, client);
    });
  }

  /** Stops forwarding on every open connection (nothing is closed). */
  stall() {
    for (const connection of this.connections) {
      if (!connection.client.destroyed) connection.stalled = true;
    }
  }

  /** Connections made so far, stalled or not. */
  get count() {
    return this.connections.length;
  }

  async close() {
    for (const { client, upstream } of this.connections) {
      client.destroy();
      upstream.destroy();
    }
    await new Promise((done) => this.server.close(done));
  }
}
