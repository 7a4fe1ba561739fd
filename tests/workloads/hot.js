// JIT workload for the profiler: run with node --perf-basic-prof, which
// writes /tmp/perf-PID.map so JIT frames can be named.
function hotLoop(n) {
  let s = 0;
  for (let i = 0; i < n; i++) s += i % 7;
  return s;
}
const end = Date.now() + Number(process.argv[2] || 3) * 1000;
let t = 0;
console.log(process.pid);
while (Date.now() < end) t += hotLoop(1e6);
