#!/usr/bin/env node
// An HTTP/2 server and client on Node's own http2 module (nghttp2 inside
// node, OpenSSL linked into the node binary), each a process of its own,
// driven by tests/h2_peers.py.
//
// server: node_h2.js server --counts FILE [--port 0] [--tls-port 0 --cert C --key K]
//   cleartext h2c (prior knowledge) on --port and HTTP/2 over TLS (ALPN h2
//   only) on --tls-port, both on 127.0.0.1; 0 picks a free port. Prints
//   "ready H2C_PORT TLS_PORT PID" (TLS_PORT 0 without --cert). Routes, any method:
//     /         200 "hello\n"
//     /missing  404
//     /boom     500
//     /big      200, 100 KiB (several DATA frames)
//     /slow     200 "slow\n" after 100 ms
//     /echo     200, the request body back
//     else      404
//   Counts per (method, path without query, status) of the streams that
//   closed; a stream whose response was not ended, or that closed with a
//   reset (RST_STREAM other than NO_ERROR), counts with status "reset".
//   SIGUSR2 (SIGUSR1 is node's debugger) dumps them to --counts
//   (atomically, with a sequence number and the streams still open);
//   SIGTERM/SIGINT dumps them and exits 0.
//
// client: node_h2.js client --url http://127.0.0.1:P|https://... --paths /,/missing
//         [--n 1] [--method GET] [--body TEXT] [--traceparent none|random|VALUE]
//         [--ca CERT] [--concurrency 1] [--linger S]
//   one session (one connection); --n rounds over --paths, up to
//   --concurrency streams in flight; prints one JSON object {"pid", "calls":
//   [{"method", "path", "status", "bytes", "traceparent"}]}; status is
//   "error: ..." for a stream that failed.
'use strict';
const http2 = require('http2');
const fs = require('fs');
const crypto = require('crypto');

function parseArgs(argv) {
  const out = { _: [] };
  for (let i = 0; i < argv.length; i++) {
    if (argv[i].startsWith('--')) out[argv[i].slice(2)] = argv[++i];
    else out._.push(argv[i]);
  }
  return out;
}

const BIG = Buffer.alloc(100 * 1024, 'b');

function serve(args) {
  const counts = new Map();
  let open = 0;
  let seq = 0;
  const dump = () => {
    seq += 1;
    const doc = { seq, pid: process.pid, in_flight: open,
                  counts: [...counts.entries()].sort().map(([k, n]) => [...JSON.parse(k), n]) };
    fs.writeFileSync(args.counts + '.tmp', JSON.stringify(doc));
    fs.renameSync(args.counts + '.tmp', args.counts);
  };

  const onStream = (stream, headers) => {
    const method = headers[':method'];
    const path = (headers[':path'] || '').split('?')[0];
    let status = 404;
    open += 1;
    stream.on('error', () => {});
    stream.on('close', () => {
      open -= 1;
      // answered: headers sent, the body ended, and the stream closed without a reset
      const finished = stream.headersSent && stream.writableEnded &&
        stream.rstCode === http2.constants.NGHTTP2_NO_ERROR;
      const key = JSON.stringify([method, path, finished ? status : 'reset']);
      counts.set(key, (counts.get(key) || 0) + 1);
    });
    const send = (code, body) => {
      status = code;
      if (stream.destroyed || stream.closed) return;
      stream.respond({ ':status': code, 'content-type': 'text/plain', 'content-length': body.length });
      stream.end(body);
    };
    const chunks = [];
    stream.on('data', (c) => chunks.push(c));
    stream.on('end', () => {
      switch (path) {
        case '/': send(200, Buffer.from('hello\n')); break;
        case '/missing': send(404, Buffer.from('missing\n')); break;
        case '/boom': send(500, Buffer.from('boom\n')); break;
        case '/big': send(200, BIG); break;
        case '/slow': setTimeout(() => send(200, Buffer.from('slow\n')), 100); break;
        case '/echo': send(200, Buffer.concat(chunks)); break;
        default: send(404, Buffer.from('no route\n'));
      }
    });
  };

  const servers = [];
  const listen = (srv, port) => new Promise((resolve, reject) => {
    srv.on('stream', onStream);
    srv.on('sessionError', () => {});
    srv.once('error', reject);
    srv.listen(Number(port || 0), '127.0.0.1', () => resolve(srv.address().port));
    servers.push(srv);
  });
  const jobs = [listen(http2.createServer(), args.port)];
  if (args.cert) {
    jobs.push(listen(http2.createSecureServer({ cert: fs.readFileSync(args.cert), key: fs.readFileSync(args.key),
                                                allowHTTP1: false }), args['tls-port']));
  }
  Promise.all(jobs).then(([h2c, tls]) => {
    console.log(`ready ${h2c} ${tls || 0} ${process.pid}`);
  }, (e) => { console.error(`cannot listen: ${e.message}`); process.exit(1); });
  process.on('SIGUSR2', dump);
  const stop = () => { dump(); process.exit(0); };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
}

function traceparent(mode) {
  if (!mode || mode === 'none') return null;
  if (mode === 'random') {
    return `00-${crypto.randomBytes(16).toString('hex')}-${crypto.randomBytes(8).toString('hex')}-01`;
  }
  return mode;
}

function client(args) {
  const paths = (args.paths || '/').split(',');
  const n = Number(args.n || 1);
  const method = args.method || 'GET';
  const concurrency = Number(args.concurrency || 1);
  const opts = {};
  if (args.ca) opts.ca = fs.readFileSync(args.ca);
  const session = http2.connect(args.url, opts);
  session.on('error', (e) => { console.error(`session error: ${e.message}`); process.exit(1); });
  const plan = [];
  for (let i = 0; i < n; i++) for (const p of paths) plan.push(p);
  const calls = new Array(plan.length);
  let next = 0;

  const one = (i) => new Promise((resolve) => {
    const tp = traceparent(args.traceparent);
    const headers = { ':method': method, ':path': plan[i] };
    if (tp) headers.traceparent = tp;
    const req = session.request(headers, { endStream: args.body === undefined });
    const call = { method, path: plan[i], status: null, bytes: 0, traceparent: tp };
    req.on('response', (h) => { call.status = h[':status']; });
    req.on('data', (c) => { call.bytes += c.length; });
    req.on('end', () => {});
    req.on('close', () => {
      if (call.status === null || req.rstCode) call.status = `error: rst ${req.rstCode}`;
      calls[i] = call;
      resolve();
    });
    req.on('error', (e) => { call.status = `error: ${e.message}`; });
    if (args.body !== undefined) req.end(args.body);
  });
  const worker = async () => { while (next < plan.length) await one(next++); };
  const workers = [];
  for (let w = 0; w < Math.min(concurrency, plan.length); w++) workers.push(worker());
  Promise.all(workers).then(() => {
    session.close(() => {
      process.stdout.write(JSON.stringify({ pid: process.pid, calls }) + '\n', () => {
        setTimeout(() => process.exit(0), 1000 * Number(args.linger || 0));
      });
    });
  });
}

const args = parseArgs(process.argv.slice(2));
const role = args._[0];
if (role === 'server') serve(args);
else if (role === 'client') {
  setTimeout(() => { console.error('client: gave up after 60 s'); process.exit(3); }, 60000).unref();
  client(args);
} else {
  console.error('usage: node_h2.js server|client ...');
  process.exit(2);
}
