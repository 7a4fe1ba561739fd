// An event-loop HTTP/1.1 server (Node's http module, one thread serves
// every connection) whose routes burn CPU in the handler, between reading
// the request and writing its response, and burn again once the response
// is written (setImmediate), outside any request.
//
//   GET /heavy?units=N, GET /light?units=N   burn N units in the handler,
//       then `after` units (--after, default the same N) after the response
//   GET /stats   {"routes": {route: {"handler_ms", "after_ms", "requests"}}, "pid"}
//
// Burn times are wall times of synchronous loops (Node 20 has no per-thread
// CPU clock); on an otherwise idle CPU they are CPU time.
//
//   node cpu_routes_node.js [--after-ratio 1.0]
// prints "ready PORT PID" once listening.
'use strict';
const http = require('http');

const LOOP_PER_UNIT = 600000;   // ~1 ms of CPU per unit on this machine
const flag = process.argv.indexOf('--after-ratio');
const afterRatio = flag > 0 ? Number(process.argv[flag + 1]) : 1.0;
const routes = { '/heavy': { handler_ms: 0, after_ms: 0, requests: 0 }, '/light': { handler_ms: 0, after_ms: 0, requests: 0 } };

function burnInRequest(units) {
  let x = 0;
  for (let i = 0; i < units * LOOP_PER_UNIT; i++) x += i % 7;
  return x;
}

function burnAfterResponse(units) {
  let x = 0;
  for (let i = 0; i < units * LOOP_PER_UNIT; i++) x += i % 5;
  return x;
}

function timed(fn, units) {
  const t0 = performance.now();
  fn(units);
  return performance.now() - t0;
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  let body;
  if (url.pathname === '/stats') {
    body = JSON.stringify({ routes, pid: process.pid });
  } else if (routes[url.pathname]) {
    const r = routes[url.pathname];
    const units = Number(url.searchParams.get('units') || 1);
    r.handler_ms += timed(burnInRequest, units);
    r.requests += 1;
    setImmediate(() => { r.after_ms += timed(burnAfterResponse, Math.round(units * afterRatio)); });
    body = 'done\n';
  } else {
    res.writeHead(404, { 'Content-Length': 0 });
    res.end();
    return;
  }
  res.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
});
server.keepAliveTimeout = 60000;
server.listen(0, '127.0.0.1', () => {
  console.log(`ready ${server.address().port} ${process.pid}`);
});
process.on('SIGTERM', () => { server.close(); process.exit(0); });
